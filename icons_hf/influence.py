"""Specialist scores: per-task influence of every training row, as a ``Dataset.map`` over the train stores.

With checkpoints ``c`` of weight ``w_c``, a pool row ``z`` and a validation example ``v`` of task ``k`` have the
weighted cosine ``c_v(z) = sum_c w_c cos(g_z^c, g_v^c)``. The *specialist* (:mod:`icons_hf.specialists`, a
registry) combines a task's examples: ``"balanced"`` (default; max over examples of within-pool percentile
ranks), ``"zscore"``, ``"mean"`` (the ICONS paper, following LESS; the paper preset) and ``"mean_released"`` (the
released scripts' unnormalised MME subtasks). Every default comes from :class:`icons_hf.settings.InfluenceSettings`.

Why ``"balanced"`` is the default: in the easy-VQA replica (``examples/replica``, README) the mean specialist's
selections drift toward one answer and, with the other defaults, lose to random; the balanced one does not.

What runs where. The pool is scored by one ``Dataset.map(batched=True)`` over checkpoint 0's memory-mapped train
store(s) (:func:`icons_hf.store.load_gradients`); the map function reads the same rows of the other checkpoints'
stores by position, multiplies each checkpoint's unit features by its validation matrix (float16 features are
converted to float32 a slice at a time), sums the checkpoints with their weights and hands the pages of the
batch back to the operating system, so memory does not grow with the pool.

* Row-wise specialists (``"mean"``, ``"mean_released"``): each task's validation examples are reduced once per
  checkpoint to one vector per subtask; the map writes the task scores (``max`` over subtasks) directly.
* Per-example specialists (``"balanced"``, ``"zscore"``): the product is with every validation example's unit
  vector (cost grows with the number of validation examples ``V``); the map writes each batch's cosines into a
  temporary ``4 x rows x V``-byte column-major file (``work_dir``; each batch its own rows, so ``num_proc``
  processes write disjoint ranges), then the task scores are combined column by column (a rank needs the whole
  column), one column in memory at a time.

Caching. The result is written as ``cache-<fingerprint>.arrow`` beside checkpoint 0's first train store shard
(``datasets``' convention for ``map`` results), or at ``cache_file_name``; the fingerprint hashes every store's
metadata and shard files (names, sizes, modification times), the tasks and the settings that change scores. An
unchanged rerun loads that file and computes nothing; a cache file of other inputs is recomputed and replaced.

Scores are float32: beyond about 16M pool rows, neighbouring percentile ranks can round to the same value (ties
are then broken as ``select`` documents). Checkpoint weights are the learning rates the train stores recorded,
normalised to sum to one; equal weights when none were recorded; or an explicit ``checkpoint_weights``. The paper
preset uses the same learning-rate-weighted sum as LESS when given several checkpoints (the released scripts
score one checkpoint; with one it is their rule exactly).

Row identity: when the train stores carry a string column ``record_hash`` (or, for a tokenized pool without
one, ``input_hash``), the score table carries it too, in pool order (parts concatenated in order); the provenance
names the columns an ``input_hash`` covers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import mmap
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from datasets import Dataset, concatenate_datasets, is_caching_enabled
from datasets.fingerprint import Hasher, get_temporary_cache_files_directory

from .pools import INPUT_HASH_COLUMN, RECORD_HASH_COLUMN
from .provenance import Provenance, provenance
from .settings import FeatureSettings, InfluenceSettings
from .specialists import SPECIALISTS as SPECIALIST_REGISTRY
from .specialists import Specialist
from .store import iter_store_batches, load_gradients, read_store_metadata

logger = logging.getLogger(__name__)

TASK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a task name becomes the column influence_<task>
_TASK_NAME = TASK_NAME  # the earlier name, kept until every caller uses TASK_NAME
SPECIALISTS = tuple(SPECIALIST_REGISTRY)  # registered when this module was imported; the registry is live
CACHE_VERSION = "icons_hf.influence/2"
IDENTITY_COLUMNS = (RECORD_HASH_COLUMN, INPUT_HASH_COLUMN)  # per-row identity carried from the stores
_CHUNK_VALUES = 1 << 23  # float32 values converted at a time (32 MiB)


def _as_list(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def _normalise_tasks(tasks: Mapping, n_ckpt: int) -> dict[str, dict[str, list[str]]]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks must be a non-empty mapping task name -> validation store path(s).")
    out = {}
    for task, spec in tasks.items():
        if not TASK_NAME.match(str(task)):
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
                    f"but there are {n_ckpt} train store(s); give one validation store per checkpoint, "
                    "in the same order."
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
    choice = (a.get("gradient_parameters", "trainable"), b.get("gradient_parameters", "trainable"))
    if choice[0] != choice[1]:
        raise ValueError(
            f"{other_path} holds gradients of parameters={choice[1]!r} but {train_path} of parameters={choice[0]!r}; "
            "compute every store of a run with the same parameters setting."
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


def checkpoint_weights_from_stores(train: Sequence[str]) -> list[float]:
    rates = [read_store_metadata(p).get("learning_rate") for p in train]
    if all(r is None for r in rates):
        if len(train) > 1:
            logger.warning(
                "none of the %d train stores recorded its checkpoint's learning rate; the checkpoints are weighted "
                "equally (pass checkpoint_weights= to weight them).", len(train),
            )
        return [1.0 / len(train)] * len(train)
    if any(r is None for r in rates):
        missing = [p for p, r in zip(train, rates, strict=True) if r is None]
        raise ValueError(
            f"{missing[0]} recorded no learning rate while other train stores did; pass checkpoint_weights= explicitly."
        )
    total = float(sum(rates))
    if total <= 0:
        raise ValueError(
            f"the checkpoints' learning rates {rates} sum to {total}; pass checkpoint_weights= explicitly."
        )
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
    for path, meta in zip(parts, metas, strict=True):
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
        if (
            len(checkpoint_weights) != len(train)
            or any(w < 0 for w in checkpoint_weights)
            or sum(checkpoint_weights) <= 0
        ):
            raise ValueError(
                f"checkpoint_weights={list(checkpoint_weights)} must hold {len(train)} non-negative numbers "
                "with a positive sum."
            )
        weights = [float(w) / float(sum(checkpoint_weights)) for w in checkpoint_weights]
    return train, tasks, metas, weights


@dataclass(frozen=True)
class InfluencePlan:
    """Everything the pool's scoring needs, validated: the train store parts per checkpoint, tasks, merged
    metadata, weights, the specialist, one ``dim x columns`` float32 matrix per checkpoint, which task each
    column belongs to, and the fingerprint of the result."""

    train: list
    tasks: dict
    metas: list
    weights: list
    specialist: Specialist
    matrices: list
    owners: list
    n_rows: int
    fingerprint: str
    settings: InfluenceSettings

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def columns_of(self) -> dict[str, list[int]]:
        """Task -> the matrix columns that belong to it."""
        return {t: [j for j, (task, _) in enumerate(self.owners) if task == t] for t in self.tasks}


def compute_influence(
    train,
    tasks: Mapping,
    *,
    specialist: str | None = None,
    checkpoint_weights: Sequence[float] | None = None,
    batch_size: int | None = None,
    cache_file_name: str | None = None,
    work_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    preset: str | None = None,
    settings: InfluenceSettings | Mapping | None = None,
):
    """Per-task influence scores of every training row.

    Args:
        train: train store path(s), one per checkpoint. A checkpoint given as a list of stores (parts of one pool,
            e.g. its image rows and its text-only rows) is scored as their concatenation: ``index`` then counts pool
            rows across the parts in order (part ``i``'s row ``r`` is ``r`` plus the rows of the parts before it).
        tasks: ``task -> validation store path(s)`` (one per checkpoint, same order as ``train``), or
            ``task -> {subtask -> path(s)}``.
        specialist: how a task's validation examples are combined (:mod:`icons_hf.specialists`): ``"balanced"``
            (default), ``"zscore"``, ``"mean"`` (the paper's mean cosine) or ``"mean_released"``.
        checkpoint_weights: explicit per-checkpoint weights (normalised to sum to one).
        batch_size: train rows per ``map`` batch (scores do not depend on it).
        cache_file_name: where the score table is written (default: ``datasets``' cache beside the train store).
        work_dir: folder for the temporary per-example cosine file of per-example specialists
            (``4 x rows x validation examples`` bytes, removed afterwards; checked for room first); when ``None``,
            the folder of ``cache_file_name`` if given, else the system's temporary folder.
        num_proc: processes for the ``map`` (scores do not depend on it).
        preset, settings: :class:`icons_hf.settings.InfluenceSettings` to start from (``"default"``, ``"paper"``);
            any argument above that is not ``None`` overrides them.

    Returns:
        A ``datasets.Dataset`` with ``index`` (and ``record_hash`` when the train stores carry it) and one float32
        column ``influence_<task>`` per task, in the train stores' row order. Its provenance
        (:func:`icons_hf.provenance.provenance`) holds the stores, weights, projection and the settings.
    """
    config = InfluenceSettings.resolve(settings, preset, specialist=specialist, batch_size=batch_size,
                                       checkpoint_weights=checkpoint_weights, num_proc=num_proc)
    plan = plan_influence(train, tasks, config)
    target = _result_path(plan, cache_file_name)
    cached = _load_cached(target, plan.fingerprint)
    features = feature_provenance(plan.metas[0])
    warn_feature_preset(features, preset)
    if cached is not None:
        logger.info("influence served from cache %s", target)
        return cached
    scores = _score_pool(plan, target, work_dir, cache_file_name)
    info = {"influence": influence_provenance(plan.train, plan.tasks, plan.weights, plan.metas,
                                              specialist=plan.specialist.name, settings=config.to_dict(),
                                              fingerprint=plan.fingerprint),
            "features": features}
    files = [f["filename"] for f in scores.cache_files]
    _write_sidecar(target, {"fingerprint": plan.fingerprint, "files": files, "provenance": info})
    return _load_cached(target, plan.fingerprint) if files else Provenance.from_dict(info).attach(scores)


def _score_pool(plan: InfluencePlan, target: str, work_dir, cache_file_name):
    """The score table, written to ``target``: by the row-wise map, or by the per-example map and column step."""
    pools = [_pool_dataset(parts) for parts in plan.train]
    if plan.n_rows == 0:  # Dataset.map returns an empty dataset unchanged
        hashes = {c: pa.array([], pa.string()) for c in IDENTITY_COLUMNS if c in pools[0].data.column_names}
        empty = {**hashes, **{f"influence_{t}": pa.array([], pa.float32()) for t in plan.task_names}}
        return _write_table(pa.table({"index": pa.array([], pa.int64()), **empty}), target)
    if plan.specialist.per_example:
        folder = _cosine_folder(work_dir, cache_file_name, 4 * len(plan.owners) * plan.n_rows)
        return _score_per_example(plan, pools, target, folder)
    return _map_pool(plan, pools, {"cache_file_name": target})


def plan_influence(train, tasks: Mapping, config: InfluenceSettings) -> InfluencePlan:
    """Validates the inputs and builds the validation matrices (:class:`InfluencePlan`)."""
    spec = SPECIALIST_REGISTRY[config.specialist]
    train, tasks, metas, weights = resolve_inputs(train, tasks, config.checkpoint_weights)
    matrices, owners = validation_matrices(train, tasks, metas, spec)
    for c in range(1, len(train)):
        if metas[c]["num_features"] != metas[0]["num_features"] or metas[c]["num_rows"] != metas[0]["num_rows"]:
            raise ValueError(f"train stores {_name(train[0])} and {_name(train[c])} hold different rows; compute them "
                             "on the same pool.")
    stores = [p for parts in train for p in parts] + [p for subs in tasks.values() for ps in subs.values() for p in ps]
    changing = {k: v for k, v in config.to_dict().items() if k not in ("batch_size", "num_proc")}
    fingerprint = Hasher.hash([CACHE_VERSION, changing, weights, tasks, [parts for parts in train],
                               [_store_identity(p) for p in stores]])
    return InfluencePlan(train, tasks, metas, weights, spec, matrices, owners, int(metas[0]["num_features"]),
                         fingerprint, config)


def _store_identity(path: str) -> list:
    """What identifies a store's content for the cache: its metadata and its shard files' names, sizes, times."""
    folder = os.path.join(path, "shards")
    files = sorted(f for f in os.listdir(folder) if not f.startswith("cache-")) if os.path.isdir(folder) else []
    stats = [(f, os.path.getsize(os.path.join(folder, f)), os.path.getmtime(os.path.join(folder, f))) for f in files]
    return [os.path.abspath(path), read_store_metadata(path), stats]


def _validation_rows(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row indices, features float64, norms float64)`` of a validation store; a zero gradient is an error."""
    _require_rows(path)
    indices, blocks, norms = [], [], []
    for index, features, norm in iter_store_batches(path, 1024):
        zero = np.flatnonzero(norm == 0)
        if len(zero):
            raise ValueError(f"{path}: validation row {int(index[zero[0]])} has a zero gradient; remove it.")
        indices.append(np.asarray(index, dtype=np.int64))
        blocks.append(features.astype(np.float64))
        norms.append(norm.astype(np.float64))
    return np.concatenate(indices), np.concatenate(blocks), np.concatenate(norms)


def validation_matrices(train, tasks, metas, spec: Specialist) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """Per checkpoint the ``dim x columns`` float32 matrix the pool's unit features are multiplied by, and the
    ``(task, subtask)`` of each column. Per-example specialists need the same validation rows at every
    checkpoint (matched by row index)."""
    pairs = [(task, sub) for task, subs in tasks.items() for sub in subs]
    matrices, first_rows = [], {}
    owners = []
    for c, parts in enumerate(train):
        blocks, owners = [], []
        for task, sub in pairs:
            path = tasks[task][sub][c]
            _check_compatible(metas[c], read_store_metadata(path), _name(parts), path)
            rows, features, norms = _validation_rows(path)
            block = spec.reduce_validation(features, norms, subtask=sub != task or len(tasks[task]) > 1)
            if spec.per_example and not np.array_equal(first_rows.setdefault((task, sub), rows), rows):
                raise ValueError(
                    f"validation stores {tasks[task][sub][0]} and {path} "
                    f"({task}{'' if sub == task else '/' + str(sub)}) "
                    "hold other rows (some were skipped at one checkpoint only); every checkpoint needs the same "
                    "validation examples: recompute them with the same rows, or use specialist='mean'."
                )
            blocks.append(block)
            owners += [(task, sub)] * block.shape[1]
        matrices.append(np.concatenate(blocks, axis=1).astype(np.float32))
    return matrices, owners


@dataclass(frozen=True)
class PoolDataset:
    """One checkpoint's pool as one memory-mapped ``Dataset`` (its parts concatenated), with each part's first
    position (``bounds``) and the pool-row offset of its ``index`` (``offsets``)."""

    data: Dataset
    bounds: np.ndarray
    offsets: np.ndarray
    name: str

    def pool_index(self, positions: np.ndarray, index: np.ndarray) -> np.ndarray:
        part = np.searchsorted(self.bounds, positions, side="right") - 1
        return index.astype(np.int64) + self.offsets[part]


def _pool_dataset(parts: Sequence[str]) -> PoolDataset:
    stores = [load_gradients(p) for p in parts]
    sizes = [len(s) for s in stores]
    rows = [int(read_store_metadata(p)["num_rows"]) for p in parts]
    for column in IDENTITY_COLUMNS:
        hashes = [column in s.column_names for s in stores]
        if any(hashes) and not all(hashes):
            raise ValueError(f"{parts[hashes.index(False)]} has no {column} column while {parts[hashes.index(True)]} "
                             "has one; recompute the parts with the same version of the extraction.")
    data = concatenate_datasets(stores) if len(stores) > 1 else stores[0]
    return PoolDataset(data.with_format("arrow"), np.cumsum([0] + sizes[:-1]), np.cumsum([0] + rows[:-1]), _name(parts))


def _feature_block(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(index, rows x dim features, norms, whether the features are a zero-copy view of the table's own
    buffers)`` of an Arrow batch (a view when the batch lies in one shard)."""
    column = table.column("features")
    single = column.num_chunks == 1
    values = (column.chunks[0] if single else column.combine_chunks()).flatten()
    try:
        flat, view = values.to_numpy(zero_copy_only=True), single
    except pa.ArrowInvalid:
        flat, view = values.to_numpy(zero_copy_only=False), False
    return table.column("index").to_numpy(), flat.reshape(len(table), -1), table.column("norm").to_numpy(), view


@functools.lru_cache(maxsize=2)
def _scratch(rows: int, dim: int) -> np.ndarray:
    """One reused float32 buffer per process (fresh allocations cost page faults on every batch)."""
    return np.empty((rows, dim), dtype=np.float32)


def unit_products(features: np.ndarray, norms: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(features / norms) @ matrix`` in float32; float16 rows are converted a slice at a time into a reused
    float32 buffer (float16 has no fast matmul)."""
    out = np.empty((len(features), matrix.shape[1]), dtype=np.float32)
    if features.dtype == np.float32:
        np.matmul(features, matrix, out=out)
    else:
        chunk = max(1, _CHUNK_VALUES // max(1, features.shape[1]))
        buffer = _scratch(chunk, features.shape[1])
        for lo in range(0, len(features), chunk):
            block = features[lo : lo + chunk]
            np.copyto(buffer[: len(block)], block)
            np.matmul(buffer[: len(block)], matrix, out=out[lo : lo + len(block)])
    out /= norms[:, None]
    return out


def weighted_products(batch: pa.Table, positions: np.ndarray, pools: Sequence[PoolDataset],
                      matrices: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(pool row index, rows x columns float64 sum_c w_c products)`` of one batch of checkpoint 0's rows and the
    same positions of the other checkpoints' pools, whose row indices must agree."""
    lo, hi = int(positions[0]), int(positions[-1]) + 1
    total, index = None, None
    for c, pool in enumerate(pools):
        table = batch if c == 0 else pool.data[lo:hi]
        if c and len(table) != len(batch):
            raise ValueError(f"{pool.name} holds fewer rows than {pools[0].name}; compute them on the same pool.")
        raw_index, features, norms, view = _feature_block(table)
        rows = pool.pool_index(positions, raw_index)
        zero = np.flatnonzero(norms == 0)
        if len(zero):
            raise ValueError(f"{pool.name}: row {int(rows[zero[0]])} has a zero gradient feature.")
        if index is None:
            index = rows
        elif not np.array_equal(rows, index):
            raise ValueError(
                f"{pool.name} and {pools[0].name} list different row indices; compute them on the same pool."
            )
        scores = unit_products(features, norms, matrices[c]).astype(np.float64)
        total = weights[c] * scores if total is None else total + weights[c] * scores
        if view and pool.data.cache_files:  # pages of the memory-mapped store file, not of a copy
            release_pages(features)
    return index, total


def score_batch(batch: pa.Table, positions, *, pools, matrices, weights, specialist: str, columns_of: dict,
                cosine_file: str | None, n_rows: int) -> pa.Table:
    """The ``Dataset.map`` function: one batch of pool rows -> ``index`` (+ ``record_hash``) and either the task
    scores (row-wise specialists) or nothing more, its per-example cosines written to ``cosine_file``."""
    positions = np.asarray(positions, dtype=np.int64)
    index, total = weighted_products(batch, positions, pools, matrices, weights)
    out = {"index": pa.array(index)}
    for column in IDENTITY_COLUMNS:
        if column in batch.column_names:
            out[column] = batch.column(column)
    if cosine_file is None:
        combine = SPECIALIST_REGISTRY[specialist].combine
        for task, cols in columns_of.items():
            out[f"influence_{task}"] = pa.array(combine(total[:, cols]).astype(np.float32))
    else:
        write_cosine_rows(cosine_file, n_rows, int(positions[0]), total.astype(np.float32))
    return pa.table(out)


def _map_pool(plan: InfluencePlan, pools: Sequence[PoolDataset], target: Mapping, cosine_file: str | None = None):
    """Runs :func:`score_batch` over checkpoint 0's pool (``target``: ``cache_file_name`` of the map)."""
    kwargs = {"pools": pools, "matrices": plan.matrices, "weights": plan.weights, "specialist": plan.specialist.name,
              "columns_of": plan.columns_of(), "cosine_file": cosine_file, "n_rows": plan.n_rows}
    return pools[0].data.map(
        score_batch, batched=True, batch_size=plan.settings.batch_size, with_indices=True, fn_kwargs=kwargs,
        num_proc=plan.settings.num_proc, load_from_cache_file=False, new_fingerprint=plan.fingerprint,
        desc="influence", **target,
    ).with_format(None)


def _score_per_example(plan: InfluencePlan, pools: Sequence[PoolDataset], target: str | None, folder: str):
    """Per-example specialists: the map writes the cosine file (and the index), then each task's columns are
    combined one column at a time and the table is written to ``target``."""
    temp = tempfile.mkdtemp(prefix="icons_cosines_", dir=folder)
    try:
        cosine_file = create_cosine_file(temp, len(plan.owners), plan.n_rows)
        rows = _map_pool(plan, pools, {"cache_file_name": os.path.join(temp, "rows.arrow")}, cosine_file)
        columns = combine_examples(cosine_file, plan)
        keep = rows.with_format("arrow")[:]
        identity = (
            {"index": keep.column("index").cast(pa.int64())} if len(keep) else {"index": pa.array([], pa.int64())}
        )
        for column in IDENTITY_COLUMNS:
            if column in keep.column_names:
                identity[column] = keep.column(column)
        table = pa.table({**identity, **{f"influence_{t}": pa.array(col, pa.float32()) for t, col in columns.items()}})
        if target is None:
            return Dataset(table)
        return _write_table(table, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _write_table(table: pa.Table, path: str) -> Dataset:
    """Writes ``table`` as an Arrow stream file at ``path`` (atomically) and opens it memory-mapped."""
    from datasets.arrow_writer import ArrowWriter

    partial = f"{path}.partial-{os.getpid()}"
    writer = ArrowWriter(path=partial, schema=table.schema)
    for batch in table.to_batches(max_chunksize=1 << 16):
        writer.write_table(pa.Table.from_batches([batch], schema=table.schema))
    writer.finalize()
    os.replace(partial, path)
    return Dataset.from_file(path)


def combine_examples(cosine_file: str, plan: InfluencePlan) -> dict[str, np.ndarray]:
    """Per task, its examples' cosine columns combined by the specialist (one column in memory at a time)."""
    combine = plan.specialist.combine
    out = {}
    for task, cols in plan.columns_of().items():
        columns = (read_cosine_column(cosine_file, plan.n_rows, j) for j in cols)
        out[task] = np.asarray(combine(columns, plan.n_rows)).astype(np.float32)
    return out


def create_cosine_file(folder: str, n_columns: int, n_rows: int) -> str:
    """An empty ``columns x rows`` float32 file (column-major) in ``folder``."""
    path = os.path.join(folder, "cosines.f32")
    with open(path, "wb") as handle:
        handle.truncate(4 * n_columns * n_rows)
    return path


def write_cosine_rows(path: str, n_rows: int, first_row: int, block: np.ndarray) -> None:
    """Writes ``block`` (``rows x columns`` float32, the rows from ``first_row`` on) into the column-major file."""
    columns = np.ascontiguousarray(block.T)
    fd = os.open(path, os.O_WRONLY)
    try:
        for j in range(columns.shape[0]):
            os.pwrite(fd, columns[j].tobytes(), 4 * (j * n_rows + first_row))
    finally:
        os.close(fd)


def read_cosine_column(path: str, n_rows: int, j: int) -> np.ndarray:
    """Column ``j`` (every pool row's cosine with validation example ``j``)."""
    return np.fromfile(path, dtype=np.float32, count=n_rows, offset=4 * j * n_rows)


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def release_pages(block: np.ndarray) -> None:
    """Hands the pages under ``block``, a read-only view of a memory-mapped file, back to the operating system
    (Linux; elsewhere nothing): they are file pages, read again if touched, so resident memory stays at about
    one batch. Never call it on other memory (``MADV_DONTNEED`` zeroes anonymous pages)."""
    madvise = _madvise()
    if madvise is None or block.nbytes == 0 or block.flags.writeable:
        return
    start = block.__array_interface__["data"][0]
    end = start + block.nbytes
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the block only
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        madvise(first, last - first, mmap.MADV_DONTNEED)


def _result_path(plan: InfluencePlan, cache_file_name) -> str | None:
    """Where the score table goes: ``cache_file_name``; else ``cache-<fingerprint>.arrow`` beside checkpoint 0's
    first train store shard (``datasets``' own place for ``map`` results) when caching is enabled and that folder
    is writable, else ``datasets``' temporary cache folder."""
    if cache_file_name is not None:
        return os.path.abspath(os.fspath(cache_file_name))
    name = f"cache-{plan.fingerprint}.arrow"
    if is_caching_enabled():
        folder = os.path.join(plan.train[0][0], "shards")
        if os.access(folder, os.W_OK):
            return os.path.join(folder, name)
        logger.info("%s is not writable; the score table goes to datasets' temporary cache folder", folder)
    return os.path.join(get_temporary_cache_files_directory(), name)


def _sidecar(path: str) -> str:
    return f"{path}.icons.json"


def _write_sidecar(path: str, payload: Mapping) -> None:
    partial = f"{_sidecar(path)}.partial-{os.getpid()}"
    with open(partial, "w") as handle:
        json.dump(payload, handle)
    os.replace(partial, _sidecar(path))


def _load_cached(path: str, fingerprint: str):
    """The score table at ``path`` when its record says it was computed from the same inputs, else ``None``."""
    try:
        with open(_sidecar(path)) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or not record.get("files"):
        return None
    if not all(os.path.isfile(f) for f in record["files"]):
        return None
    parts = [Dataset.from_file(f) for f in record["files"]]
    table = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return Provenance.from_dict(record["provenance"]).attach(table)


def _cosine_folder(work_dir, cache_file_name, nbytes: int) -> str:
    """Where the per-example cosine file goes (``work_dir``; else the cache file's folder; else the system's
    temporary folder), checked to exist and to have room for it."""
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
            f"the per-example specialist needs {nbytes / 2**30:.2f} GiB of temporary space for its cosines "
            f"(4 bytes x pool rows x validation examples) but {what} has {free / 2**30:.2f} GiB free; pass "
            "work_dir= (--work-dir) a folder with room, use fewer validation examples, or specialist='mean'."
        )
    return folder


def influence_provenance(
    train: Sequence[str], tasks: Mapping, weights: Sequence[float], metas: Sequence[Mapping], **extra
) -> dict:
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
        "input_hash_columns": input_hash_columns(train[0]),
    }


# Feature settings that change what a feature is (the others change only how it is computed or stored).
FEATURE_DEFINING = ("train_feature", "adam_variant", "parameters", "projection", "dim", "seed")


def feature_provenance(meta: Mapping) -> dict:
    """``{"settings": the train store's feature settings, "presets": the FeatureSettings presets they match}``
    (``train_feature`` is the feature the store holds; a setting a store predates takes its value of that time,
    the default). Stores that record no settings give ``{"settings": None, "presets": []}``."""
    recorded = meta.get("settings")
    if not isinstance(recorded, Mapping):
        return {"settings": None, "presets": []}
    settings = {**FeatureSettings().to_dict(), **recorded}
    if meta.get("feature"):
        settings["train_feature"] = meta["feature"]
    presets = [name for name in FeatureSettings.presets if not feature_differences(settings, name)]
    return {"settings": settings, "presets": presets}


def feature_differences(settings: Mapping, preset: str) -> dict[str, tuple]:
    """``setting -> (the stores' value, the preset's value)`` for the feature-defining settings that differ."""
    want = FeatureSettings.from_preset(preset).to_dict()
    out = {k: (settings.get(k), want[k]) for k in FEATURE_DEFINING if settings.get(k) != want[k]}
    if settings.get("train_feature") == want["train_feature"] == "sgd":
        out.pop("adam_variant", None)  # no Adam map: its variant changes nothing
    if settings.get("projection") == want["projection"] == "identity":
        out.pop("dim", None)
        out.pop("seed", None)
    return out


def warn_feature_preset(features: Mapping, preset: str | None) -> None:
    """Warn when ``compute_influence(preset=...)`` scores stores whose features are not that preset's."""
    if preset is None or features.get("settings") is None or preset not in FeatureSettings.presets:
        return
    diffs = feature_differences(features["settings"], preset)
    if diffs:
        logger.warning(
            "compute_influence(preset=%r) scores train stores whose features are not that preset's (%s): the scores "
            "are the preset's specialist on other features. Compute the stores with preset=%r too (IconsCallback, "
            "compute_gradients, icons-hf gradients --preset %s) for the preset's rule end to end.",
            preset, ", ".join(f"{k}={a!r}, preset {b!r}" for k, (a, b) in diffs.items()), preset, preset,
        )


def input_hash_columns(parts: Sequence[str]) -> list[str] | None:
    """The columns the ``input_hash`` of a pool's stores covers (the union over its parts), or ``None`` when the
    stores carry no input hash."""
    found = [read_store_metadata(p)["config"].get("input_hash_columns") for p in parts]
    if any(f is None for f in found):
        return None
    return sorted({c for columns in found for c in columns})



__all__ = ["SPECIALISTS", "TASK_NAME", "InfluencePlan", "checkpoint_weights_from_stores", "compute_influence",
           "feature_differences", "feature_provenance", "influence_provenance", "plan_influence", "provenance",
           "resolve_inputs"]
