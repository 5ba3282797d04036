"""Specialist scores: per-task influence of every training row, streamed from the train stores.

For task ``k`` with validation rows ``v`` and checkpoints ``c`` of weight ``w_c``::

    I_k(z) = sum_c w_c * mean_v cos(g_z^c, g_v^c)

Because ``mean_v cos(g_z, g_v) = <g_z/|g_z|, mean_v g_v/|g_v|>``, each task's validation features are reduced
once per checkpoint to one mean unit vector, and scoring the pool is one matrix product per batch of rows, read
from the memory-mapped train stores (:func:`icons_hf.store.iter_store_batches`: float16 features are converted to
float32 a slice at a time, and the pages of a batch are released once it is scored, so memory does not grow with
the pool). A task given as subtasks (``{"mme": {"count": ..., "color": ...}}``) takes
the maximum over its subtasks' scores. Checkpoint weights are the learning rates the train stores recorded,
normalised to sum to one; equal weights when none were recorded; or an explicit ``checkpoint_weights``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from .store import iter_store_batches, read_store_metadata

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


def _mean_unit_vector(path: str) -> np.ndarray:
    meta = read_store_metadata(path)
    if meta.get("complete") and meta.get("num_features") == 0:
        skipped = len(meta.get("skipped", []))
        raise ValueError(
            f"validation store {path} holds no rows{f' (all {skipped} were skipped as bad rows)' if skipped else ''}; "
            "a task needs at least one validation example."
        )
    total, count = np.zeros(int(meta["dim"]), dtype=np.float64), 0
    for index, features, norms in iter_store_batches(path, 1024):
        zero = np.flatnonzero(norms == 0)
        if len(zero):
            raise ValueError(f"{path}: validation row {int(index[zero[0]])} has a zero gradient; remove it.")
        total += (features.astype(np.float64) / norms[:, None].astype(np.float64)).sum(axis=0)
        count += len(index)
    return total / count


_CHUNK_VALUES = 1 << 23  # float32 values converted at a time (32 MiB)


def _train_scores(path: str, means: np.ndarray, batch_size: int):
    """``(index, float32 rows x columns cosine scores)`` of one train store, streamed batch by batch."""
    dim = means.shape[0]
    chunk = max(1, _CHUNK_VALUES // dim)
    buffer = None
    for index, features, norms in iter_store_batches(path, batch_size):
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


def resolve_inputs(train, tasks: Mapping, checkpoint_weights: Sequence[float] | None):
    """Validated ``(train paths, tasks, train store metadata, normalised checkpoint weights)``."""
    train = _as_list(train)
    if not train:
        raise ValueError("train must name at least one train store.")
    tasks = _normalise_tasks(tasks, len(train))
    metas = [read_store_metadata(p) for p in train]
    if checkpoint_weights is None:
        weights = checkpoint_weights_from_stores(train)
    else:
        if len(checkpoint_weights) != len(train) or any(w < 0 for w in checkpoint_weights) or sum(checkpoint_weights) <= 0:
            raise ValueError(
                f"checkpoint_weights={list(checkpoint_weights)} must hold {len(train)} non-negative numbers with a positive sum."
            )
        weights = [float(w) / float(sum(checkpoint_weights)) for w in checkpoint_weights]
    return train, tasks, metas, weights


def compute_influence(
    train,
    tasks: Mapping,
    *,
    checkpoint_weights: Sequence[float] | None = None,
    batch_size: int = 4096,
    cache_file_name: str | None = None,
):
    """Per-task influence scores of every training row.

    Args:
        train: train store path(s), one per checkpoint.
        tasks: ``task -> validation store path(s)`` (one per checkpoint, same order as ``train``), or
            ``task -> {subtask -> path(s)}`` for a task scored as the max over its subtasks.
        checkpoint_weights: explicit per-checkpoint weights (normalised to sum to one).
        batch_size: train rows read per step.
        cache_file_name: where ``datasets`` writes the score table; kept in memory when ``None``.

    Returns:
        A ``datasets.Dataset`` with ``index`` and one float32 column ``influence_<task>`` per task, in the train
        stores' row order. Its ``info.description`` holds the JSON provenance (stores, weights, projection).
    """
    train, tasks, metas, weights = resolve_inputs(train, tasks, checkpoint_weights)

    # One matrix per checkpoint: columns are the mean unit validation vectors of every (task, subtask).
    columns = [(task, sub) for task, subs in tasks.items() for sub in subs]
    means = []
    for c, train_path in enumerate(train):
        vectors = []
        for task, sub in columns:
            path = tasks[task][sub][c]
            _check_compatible(metas[c], read_store_metadata(path), train_path, path)
            vectors.append(_mean_unit_vector(path))
        means.append(np.stack(vectors, axis=1).astype(np.float32))
    for c in range(1, len(train)):
        if metas[c]["num_features"] != metas[0]["num_features"] or metas[c]["num_rows"] != metas[0]["num_rows"]:
            raise ValueError(f"train stores {train[0]} and {train[c]} hold different rows; compute them on the same pool.")

    task_names = list(tasks)
    col_of = {t: [j for j, (task, _) in enumerate(columns) if task == t] for t in task_names}

    from datasets import Dataset, Features, Value
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import InMemoryTable
    from datasets.utils.logging import is_progress_bar_enabled
    from tqdm.auto import tqdm

    features = Features({"index": Value("int64"), **{f"influence_{t}": Value("float32") for t in task_names}})
    streams = [_train_scores(p, means[c], batch_size) for c, p in enumerate(train)]
    others = [_Rows(stream, train[c + 1]) for c, stream in enumerate(streams[1:])]
    # With cache_file_name the table goes to disk batch by batch; otherwise it is kept in memory (8 + 4 x tasks
    # bytes per row).
    writer = ArrowWriter(path=cache_file_name, features=features) if cache_file_name else None
    kept: dict[str, list] = {name: [] for name in features}
    progress = tqdm(total=metas[0]["num_features"], desc="influence", unit="row", disable=not is_progress_bar_enabled())
    for index, first in streams[0]:
        total = weights[0] * first.astype(np.float64)
        for c, rows in enumerate(others, start=1):
            other_index, scores = rows.take(len(index))
            if not np.array_equal(other_index, index):
                raise ValueError(f"{train[c]} and {train[0]} list different row indices; compute them on the same pool.")
            total += weights[c] * scores
        batch = {"index": index, **{f"influence_{t}": total[:, col_of[t]].max(axis=1).astype(np.float32) for t in task_names}}
        arrays = {name: pa.array(values) for name, values in batch.items()}  # zero-copy views of the arrays
        if writer is not None:
            writer.write_table(pa.table(arrays, schema=features.arrow_schema))
        else:
            for name, values in arrays.items():
                kept[name].append(values)
        progress.update(len(index))
    progress.close()
    for c, rows in enumerate(others, start=1):
        if rows.pending or next(rows.stream, None) is not None:
            raise ValueError(f"{train[c]} holds more rows than {train[0]}; compute them on the same pool.")
    if writer is not None:
        writer.finalize()
        scores = Dataset.from_file(cache_file_name)
    else:
        schema = features.arrow_schema
        # One chunk per batch: no concatenated copy of the columns.
        chunked = [pa.chunked_array(kept[field.name], type=field.type) for field in schema]
        scores = Dataset(InMemoryTable(pa.Table.from_arrays(chunked, schema=schema)))
    scores.info.description = json.dumps({"influence": influence_provenance(train, tasks, weights, metas)})
    return scores


def influence_provenance(train: Sequence[str], tasks: Mapping, weights: Sequence[float], metas: Sequence[Mapping], **extra) -> dict:
    """The provenance a score table carries (stores, tasks and validation sizes, checkpoint weights, features)."""
    return {
        **extra,
        "train_stores": list(train),
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
