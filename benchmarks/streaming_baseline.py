"""The streaming influence path as it was before scoring became a ``Dataset.map`` (kept only as the baseline of
``benchmarks/influence.py``; not part of the library): the train stores read with
``icons_hf.store.iter_store_batches`` batch by batch, the per-example cosines of the balanced specialists written to
a temporary column file. ``stream_influence`` takes the arguments ``compute_influence`` took then."""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from icons_hf.ranks import percentile_ranks
from icons_hf.store import iter_store_batches, read_store_metadata

logger = logging.getLogger(__name__)

_TASK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _as_list(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def _normalise_tasks(tasks: Mapping, n_ckpt: int) -> dict[str, dict[str, list[str]]]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks must be a non-empty mapping task name -> validation store path(s).")
    out = {}
    for task, spec in tasks.items():
        if not _TASK_NAME.match(str(task)):
            raise ValueError(f"task name {task!r} may only use letters, digits, '_', '.', '-' (it names a column).")
        subtasks = spec if isinstance(spec, Mapping) else {task: spec}
        if not subtasks:
            raise ValueError(f"task {task!r} has no subtasks.")
        out[task] = {}
        for sub, paths in subtasks.items():
            paths = _as_list(paths)
            if len(paths) != n_ckpt:
                raise ValueError(
                    f"task {task!r}{'' if sub == task else f' subtask {sub!r}'} has {len(paths)} validation store(s) "
                    f"but there are {n_ckpt} train store(s); give one validation store per checkpoint, in the same order."
                )
            out[task][sub] = paths
    return out


def _check_compatible(train_meta: Mapping, other_meta: Mapping, train_path: str, other_path: str) -> None:
    if train_meta.get("dim") != other_meta.get("dim"):
        raise ValueError(
            f"{other_path} holds {other_meta.get('dim')}-dimensional features but {train_path} holds "
            f"{train_meta.get('dim')}-dimensional ones; compute both with the same model, projection and dim."
        )
    a, b = train_meta["config"], other_meta["config"]
    for key in ("projection", "parameters", "model_config"):
        if a.get(key) != b.get(key):
            raise ValueError(
                f"{other_path} and {train_path} differ in {key} ({json.dumps(b.get(key))[:80]} vs "
                f"{json.dumps(a.get(key))[:80]}); features of different projections or models cannot be compared. "
                "Recompute both with the same model, projection, dim and seed."
            )
    if a.get("weights") != b.get("weights"):
        raise ValueError(
            f"{other_path} was computed on other model weights than {train_path}; pair each validation store with "
            "the train store of the same checkpoint."
        )


def _require_rows(path: str) -> dict:
    meta = read_store_metadata(path)
    if meta.get("complete") and meta.get("num_features") == 0:
        skipped = len(meta.get("skipped", []))
        raise ValueError(
            f"validation store {path} holds no rows{f' (all {skipped} were skipped as bad rows)' if skipped else ''}; "
            "a task needs at least one validation example."
        )
    return meta


def _mean_unit_vector(path: str) -> np.ndarray:
    meta = _require_rows(path)
    total, count = np.zeros(int(meta["dim"]), dtype=np.float64), 0
    for index, features, norms in iter_store_batches(path, 1024):
        zero = np.flatnonzero(norms == 0)
        if len(zero):
            raise ValueError(f"{path}: validation row {int(index[zero[0]])} has a zero gradient; remove it.")
        total += (features.astype(np.float64) / norms[:, None].astype(np.float64)).sum(axis=0)
        count += len(index)
    return total / count


_CHUNK_VALUES = 1 << 23  # float32 values converted at a time (32 MiB)


def _part_batches(parts: Sequence[str], batch_size: int):
    """``iter_store_batches`` over the parts of one checkpoint's pool, in order, with row indices offset so that
    they count pool rows across the parts."""
    offset = 0
    for path in parts:
        for index, features, norms in iter_store_batches(path, batch_size):
            yield path, index + offset, features, norms
        offset += int(read_store_metadata(path)["num_rows"])


def _train_scores(parts: Sequence[str], means: np.ndarray, batch_size: int):
    """``(index, float32 rows x columns cosine scores)`` of one checkpoint's train store(s), streamed batch by batch."""
    dim = means.shape[0]
    chunk = max(1, _CHUNK_VALUES // dim)
    buffer = None
    for path, index, features, norms in _part_batches(parts, batch_size):
        zero = np.flatnonzero(norms == 0)
        if len(zero):
            raise ValueError(f"{path}: row {int(index[zero[0]])} has a zero gradient feature.")
        out = np.empty((len(index), means.shape[1]), dtype=np.float32)
        if features.dtype == np.float32:
            np.matmul(features, means, out=out)
        else:
            # float16 has no fast matmul: convert a slice of rows at a time into one reused float32 buffer rather
            # than allocating the whole batch in float32 (fresh allocations cost page faults on every batch).
            if buffer is None:
                buffer = np.empty((chunk, dim), dtype=np.float32)
            for lo in range(0, len(index), chunk):
                block = features[lo : lo + chunk]
                np.copyto(buffer[: len(block)], block)
                np.matmul(buffer[: len(block)], means, out=out[lo : lo + len(block)])
        out /= norms[:, None]
        yield index, out


class _Rows:
    """Takes exactly ``n`` rows at a time from a ``(index, scores)`` stream whatever its batch boundaries."""

    def __init__(self, stream, path: str):
        self.stream, self.path, self.pending = stream, path, []

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        parts, have = [], 0
        while have < n:
            if not self.pending:
                try:
                    self.pending.append(next(self.stream))
                except StopIteration:
                    raise ValueError(f"{self.path} holds fewer rows than the first train store.") from None
            index, scores = self.pending.pop()
            need = n - have
            if len(index) > need:
                self.pending.append((index[need:], scores[need:]))
                index, scores = index[:need], scores[:need]
            parts.append((index, scores))
            have += len(index)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


SPECIALISTS = ("balanced", "zscore", "mean")


def _unit_validation_rows(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(row indices, (dim, rows) float32)``: a validation store's unit feature vectors, one column per example."""
    _require_rows(path)
    blocks, indices = [], []
    for index, features, norms in iter_store_batches(path, 1024):
        zero = np.flatnonzero(norms == 0)
        if len(zero):
            raise ValueError(f"{path}: validation row {int(index[zero[0]])} has a zero gradient; remove it.")
        blocks.append((features.astype(np.float64) / norms[:, None].astype(np.float64)).astype(np.float32))
        indices.append(np.asarray(index, dtype=np.int64))
    return np.concatenate(indices), np.concatenate(blocks, axis=0).T


def _cosine_folder(work_dir, cache_file_name, nbytes: int) -> str:
    """Where the per-example cosine file goes (``work_dir``; else the cache file's folder; else the system's
    temporary folder), checked to exist and to have room for it."""
    import shutil
    import tempfile

    if work_dir is not None:
        folder, what = os.fspath(work_dir), f"work_dir {os.fspath(work_dir)!r}"
    elif cache_file_name:
        folder = os.path.dirname(os.path.abspath(cache_file_name))
        what = f"the folder of cache_file_name ({folder})"
    else:
        folder, what = tempfile.gettempdir(), f"the temporary folder {tempfile.gettempdir()!r}"
    if not os.path.isdir(folder):
        raise ValueError(f"{what} does not exist; create it or pass work_dir= (--work-dir) an existing folder.")
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise ValueError(
            f"the balanced specialist needs {nbytes / 2**30:.2f} GiB of temporary space for its per-example cosines "
            f"(4 bytes x pool rows x validation examples) but {what} has {free / 2**30:.2f} GiB free; pass "
            "work_dir= (--work-dir) a folder with room, use fewer validation examples, or specialist='mean'."
        )
    return folder


class _ColumnFile:
    """Per-validation-example cosines of every pool row, ``columns x rows`` float32 in a temporary file:
    written a block of rows at a time, read back one whole column at a time (memory stays one column)."""

    def __init__(self, n_columns: int, n_rows: int, work_dir: str | None, block_values: int = 1 << 24):
        import tempfile

        self.n_columns, self.n_rows = n_columns, n_rows
        self.folder = tempfile.mkdtemp(prefix="icons_cosines_", dir=work_dir)
        self.path = os.path.join(self.folder, "cosines.f32")
        self.handle = open(self.path, "w+b")
        self.handle.truncate(4 * n_columns * n_rows)
        self.block_rows = max(1, block_values // max(1, n_columns))
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.written = 0

    def add(self, scores: np.ndarray) -> None:
        self.pending.append(np.asarray(scores, dtype=np.float32))
        self.pending_rows += len(scores)
        if self.pending_rows >= self.block_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        block = np.ascontiguousarray(np.concatenate(self.pending, axis=0).T)
        for j in range(self.n_columns):
            self.handle.seek(4 * (j * self.n_rows + self.written))
            self.handle.write(block[j].tobytes())
        self.written += block.shape[1]
        self.pending, self.pending_rows = [], 0

    def column(self, j: int) -> np.ndarray:
        self.handle.seek(4 * j * self.n_rows)
        return np.fromfile(self.handle, dtype=np.float32, count=self.n_rows)

    def close(self) -> None:
        import shutil

        self.handle.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def checkpoint_weights_from_stores(train: Sequence[str]) -> list[float]:
    rates = [read_store_metadata(p).get("learning_rate") for p in train]
    if all(r is None for r in rates):
        return [1.0 / len(train)] * len(train)
    if any(r is None for r in rates):
        missing = [p for p, r in zip(train, rates) if r is None]
        raise ValueError(
            f"{missing[0]} recorded no learning rate while other train stores did; pass checkpoint_weights= explicitly."
        )
    total = float(sum(rates))
    if total <= 0:
        raise ValueError(f"the checkpoints' learning rates {rates} sum to {total}; pass checkpoint_weights= explicitly.")
    return [float(r) / total for r in rates]


def _train_parts(train) -> list[list[str]]:
    """Per checkpoint, the store(s) of its pool: a path, or a list of paths (parts scored as one pool)."""
    if isinstance(train, (str, os.PathLike)):
        return [[os.fspath(train)]]
    out = []
    for item in train:
        parts = [os.fspath(item)] if isinstance(item, (str, os.PathLike)) else [os.fspath(p) for p in item]
        if not parts:
            raise ValueError(f"checkpoint {len(out) + 1} of train lists no store; give a path or a list of paths.")
        out.append(parts)
    return out


def _name(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} more parts)"


_PART_KEYS = ("projection", "parameters", "model_config", "weights", "preconditioner")


def _merged_metadata(parts: Sequence[str]) -> dict:
    """One checkpoint's store metadata; parts must come from the same checkpoint and settings, and their row
    counts, skipped rows (offset to pool rows) and feature counts add up."""
    metas = [read_store_metadata(p) for p in parts]
    first = metas[0]
    if len(metas) == 1:
        return first
    merged = dict(first, num_rows=0, num_features=0, skipped=[], parts=list(parts))
    for path, meta in zip(parts, metas):
        for key in _PART_KEYS:
            if meta["config"].get(key) != first["config"].get(key):
                raise ValueError(
                    f"{path} and {parts[0]} are parts of one checkpoint's pool but differ in {key}; compute every part "
                    "with the same model weights, projection and feature."
                )
        for key in ("learning_rate", "checkpoint", "dim"):
            if meta.get(key) != first.get(key):
                raise ValueError(f"{path} and {parts[0]} are parts of one checkpoint's pool but record other {key}s "
                                 f"({meta.get(key)!r} vs {first.get(key)!r}).")
        merged["skipped"] += [dict(s, index=int(s["index"]) + merged["num_rows"]) for s in meta.get("skipped", [])]
        merged["num_rows"] += int(meta["num_rows"])
        merged["num_features"] += int(meta["num_features"])
    return merged


def resolve_inputs(train, tasks: Mapping, checkpoint_weights: Sequence[float] | None):
    """Validated ``(train store parts per checkpoint, tasks, merged train store metadata, normalised checkpoint
    weights)``."""
    train = _train_parts(train)
    if not train:
        raise ValueError("train must name at least one train store.")
    tasks = _normalise_tasks(tasks, len(train))
    metas = [_merged_metadata(parts) for parts in train]
    if checkpoint_weights is None:
        weights = checkpoint_weights_from_stores([parts[0] for parts in train])
    else:
        if len(checkpoint_weights) != len(train) or any(w < 0 for w in checkpoint_weights) or sum(checkpoint_weights) <= 0:
            raise ValueError(
                f"checkpoint_weights={list(checkpoint_weights)} must hold {len(train)} non-negative numbers with a positive sum."
            )
        weights = [float(w) / float(sum(checkpoint_weights)) for w in checkpoint_weights]
    return train, tasks, metas, weights


def stream_influence(
    train,
    tasks: Mapping,
    *,
    specialist: str = "balanced",
    checkpoint_weights: Sequence[float] | None = None,
    batch_size: int = 4096,
    cache_file_name: str | None = None,
    work_dir: str | os.PathLike | None = None,
):
    """Per-task influence scores of every training row.

    Args:
        train: train store path(s), one per checkpoint. A checkpoint given as a list of stores (parts of one pool,
            e.g. its image rows and its text-only rows) is scored as their concatenation: ``index`` then counts pool
            rows across the parts in order (part ``i``'s row ``r`` is ``r`` plus the rows of the parts before it).
        tasks: ``task -> validation store path(s)`` (one per checkpoint, same order as ``train``), or
            ``task -> {subtask -> path(s)}``.
        specialist: how a task's validation examples are combined (module docstring): ``"balanced"`` (default;
            every validation example gets an equal quota of top rows), ``"zscore"``, or ``"mean"`` (the paper's
            mean cosine).
        checkpoint_weights: explicit per-checkpoint weights (normalised to sum to one).
        batch_size: train rows read per step.
        cache_file_name: where ``datasets`` writes the score table; kept in memory when ``None``.
        work_dir: folder for the temporary per-example cosine file of ``"balanced"``/``"zscore"``
            (``4 x rows x validation examples`` bytes, removed afterwards; checked for room first); when ``None``,
            the folder of ``cache_file_name`` if given, else the system's temporary folder.

    Returns:
        A ``datasets.Dataset`` with ``index`` and one float32 column ``influence_<task>`` per task, in the train
        stores' row order. Its ``info.description`` holds the JSON provenance (stores, weights, specialist,
        projection).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    batch_size = int(batch_size)
    train, tasks, metas, weights = resolve_inputs(train, tasks, checkpoint_weights)

    # One matrix per checkpoint. "mean": one column per (task, subtask), its mean unit validation vector.
    # "balanced"/"zscore": one column per validation example, its unit vector.
    pairs = [(task, sub) for task, subs in tasks.items() for sub in subs]
    matrices, owners = [], None
    for c, parts in enumerate(train):
        train_path = _name(parts)
        blocks, owner = [], []
        for task, sub in pairs:
            path = tasks[task][sub][c]
            _check_compatible(metas[c], read_store_metadata(path), train_path, path)
            if specialist == "mean":
                block = _mean_unit_vector(path)[:, None]
                owner.append((task, sub, -1))
            else:
                # One column per validation example: the same example (by row index) at every checkpoint.
                rows, block = _unit_validation_rows(path)
                owner += [(task, sub, int(r)) for r in rows]
                first = tasks[task][sub][0]
                if owners is not None and [o for o in owners if o[:2] == (task, sub)] != [o for o in owner if o[:2] == (task, sub)]:
                    raise ValueError(
                        f"validation stores {first} and {path} ({task}{'' if sub == task else '/' + str(sub)}) hold "
                        "other rows (some were skipped at one checkpoint only); every checkpoint needs the same "
                        "validation examples: recompute them with the same rows, or use specialist='mean'."
                    )
            blocks.append(block)
        matrices.append(np.concatenate(blocks, axis=1).astype(np.float32))
        if owners is None:
            owners = owner
    owners = [(task, sub) for task, sub, _ in owners]
    for c in range(1, len(train)):
        if metas[c]["num_features"] != metas[0]["num_features"] or metas[c]["num_rows"] != metas[0]["num_rows"]:
            raise ValueError(f"train stores {_name(train[0])} and {_name(train[c])} hold different rows; compute them on the "
                             "same pool.")

    task_names = list(tasks)
    col_of = {t: [j for j, (task, _) in enumerate(owners) if task == t] for t in task_names}
    n_rows = int(metas[0]["num_features"])

    from datasets import Dataset, Features, Value
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import InMemoryTable
    from datasets.utils.logging import is_progress_bar_enabled

    features = Features({"index": Value("int64"), **{f"influence_{t}": Value("float32") for t in task_names}})
    # With cache_file_name the table goes to disk batch by batch; otherwise it is kept in memory (8 + 4 x tasks
    # bytes per row).
    writer = ArrowWriter(path=cache_file_name, features=features) if cache_file_name else None
    kept: dict[str, list] = {name: [] for name in features}

    def emit(batch: dict) -> None:
        arrays = {name: pa.array(values) for name, values in batch.items()}  # zero-copy views of the arrays
        if writer is not None:
            writer.write_table(pa.table(arrays, schema=features.arrow_schema))
        else:
            for name, values in arrays.items():
                kept[name].append(values)

    show = is_progress_bar_enabled()
    cosines = None
    if specialist != "mean":
        work_dir = _cosine_folder(work_dir, cache_file_name, 4 * len(owners) * n_rows)
    try:
        if specialist != "mean":
            cosines = _ColumnFile(len(owners), n_rows, work_dir)
        indices = []
        for index, total in _weighted_scores(train, matrices, weights, batch_size, n_rows, show):
            if cosines is None:
                emit({"index": index,
                      **{f"influence_{t}": total[:, col_of[t]].max(axis=1).astype(np.float32) for t in task_names}})
            else:
                indices.append(index)
                cosines.add(total)
        if cosines is not None:
            cosines.flush()
            index = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
            columns = _combine_examples(cosines, col_of, specialist, show)
            for start in range(0, max(1, len(index)), batch_size):
                emit({"index": index[start : start + batch_size],
                      **{f"influence_{t}": col[start : start + batch_size] for t, col in columns.items()}})
    finally:
        if cosines is not None:
            cosines.close()
    if writer is not None:
        writer.finalize()
        scores = Dataset.from_file(cache_file_name)
    else:
        schema = features.arrow_schema
        # One chunk per batch: no concatenated copy of the columns.
        chunked = [pa.chunked_array(kept[field.name], type=field.type) for field in schema]
        scores = Dataset(InMemoryTable(pa.Table.from_arrays(chunked, schema=schema)))
    scores.info.description = json.dumps(
        {"influence": influence_provenance(train, tasks, weights, metas, specialist=specialist)}
    )
    return scores


def _weighted_scores(train: Sequence[str], matrices: Sequence[np.ndarray], weights: Sequence[float], batch_size: int,
                     n_rows: int, show: bool):
    """``(index, rows x columns float64)``: ``sum_c w_c cos(g_z^c, column^c)``, streamed from the train stores in
    lockstep (each checkpoint's rows must list the same indices)."""
    from tqdm.auto import tqdm

    streams = [_train_scores(p, matrices[c], batch_size) for c, p in enumerate(train)]
    others = [_Rows(stream, _name(train[c + 1])) for c, stream in enumerate(streams[1:])]
    progress = tqdm(total=n_rows, desc="influence", unit="row", disable=not show)
    for index, first in streams[0]:
        total = weights[0] * first.astype(np.float64)
        for c, rows in enumerate(others, start=1):
            other_index, scores = rows.take(len(index))
            if not np.array_equal(other_index, index):
                raise ValueError(f"{_name(train[c])} and {_name(train[0])} list different row indices; compute them on the "
                                 "same pool.")
            total += weights[c] * scores
        yield index, total
        progress.update(len(index))
    progress.close()
    for c, rows in enumerate(others, start=1):
        if rows.pending or next(rows.stream, None) is not None:
            raise ValueError(f"{_name(train[c])} holds more rows than {_name(train[0])}; compute them on the same pool.")


def _combine_examples(cosines: _ColumnFile, col_of: Mapping, specialist: str, show: bool) -> dict[str, np.ndarray]:
    """Per task, the per-example cosine columns combined: max of percentile ranks (``balanced``) or mean of
    z-scores (``zscore``); one column in memory at a time."""
    from tqdm.auto import tqdm

    out = {}
    progress = tqdm(total=cosines.n_columns, desc="balancing", unit="example", disable=not show)
    for task, cols in col_of.items():
        if specialist == "balanced":
            acc = np.full(cosines.n_rows, -np.inf)
            for j in cols:
                np.maximum(acc, percentile_ranks(cosines.column(j)), out=acc)
                progress.update(1)
        else:
            acc = np.zeros(cosines.n_rows)
            for j in cols:
                col = cosines.column(j).astype(np.float64)
                std = col.std()
                acc += (col - col.mean()) / (std if std > 0 else 1.0)
                progress.update(1)
            acc /= len(cols)
        out[task] = acc.astype(np.float32)
    progress.close()
    return out


def influence_provenance(train: Sequence[str], tasks: Mapping, weights: Sequence[float], metas: Sequence[Mapping], **extra) -> dict:
    """The provenance a score table carries (stores, tasks and validation sizes, checkpoint weights, features)."""
    return {
        **extra,
        "train_stores": [parts[0] if len(parts) == 1 else list(parts) for parts in train],
        "tasks": tasks,
        "checkpoint_weights": list(weights),
        "checkpoints": [m.get("checkpoint") for m in metas],
        "learning_rates": [m.get("learning_rate") for m in metas],
        "projection": metas[0]["config"]["projection"],
        "preconditioner": metas[0]["config"]["preconditioner"],
        "num_validation": {
            t: {s: read_store_metadata(ps[0])["num_features"] for s, ps in subs.items()} for t, subs in tasks.items()
        },
        "skipped": metas[0].get("skipped", []),
        "pool_rows": metas[0]["num_rows"],
    }


def provenance(scores) -> dict:
    """The JSON provenance that ``compute_influence``/``select`` attach to a score table (empty if none)."""
    try:
        return json.loads(scores.info.description or "{}")
    except (TypeError, ValueError):
        return {}
