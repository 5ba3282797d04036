"""Specialist scores: per-task influence of every training row, as a batched ``datasets.map``.

For task ``k`` with validation rows ``v`` and checkpoints ``c`` of weight ``w_c``::

    I_k(z) = sum_c w_c * mean_v cos(g_z^c, g_v^c)

Because ``mean_v cos(g_z, g_v) = <g_z/|g_z|, mean_v g_v/|g_v|>``, each task's validation features are reduced
once per checkpoint to one mean unit vector, and scoring the pool is one matrix product per batch of rows, read
from the memory-mapped train stores. A task given as subtasks (``{"mme": {"count": ..., "color": ...}}``) takes
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

from .store import load_gradients, read_store_metadata

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
    store = load_gradients(path).with_format("numpy", columns=["index", "features", "norm"], dtype=np.float64)
    if len(store) == 0:
        raise ValueError(f"validation store {path} holds no rows; a task needs at least one validation example.")
    total = None
    for start in range(0, len(store), 4096):
        batch = store[start : start + 4096]
        norms = batch["norm"]
        zero = np.flatnonzero(norms == 0)
        if len(zero):
            raise ValueError(f"{path}: validation row {int(batch['index'][zero[0]])} has a zero gradient; remove it.")
        part = (batch["features"] / norms[:, None]).sum(axis=0)
        total = part if total is None else total + part
    return total / len(store)


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

    stores = [load_gradients(p).with_format("numpy", columns=["index", "features", "norm"], dtype=np.float32) for p in train]
    base = load_gradients(train[0]).select_columns(["index"])
    task_names = list(tasks)
    col_of = {t: [j for j, (task, _) in enumerate(columns) if task == t] for t in task_names}

    def score(batch, indices):
        lo, hi = indices[0], indices[-1] + 1
        total = np.zeros((len(indices), len(columns)), dtype=np.float64)
        for c, store in enumerate(stores):
            rows = store[lo:hi]
            if c and not np.array_equal(rows["index"], np.asarray(batch["index"])):
                raise ValueError(f"{train[c]} and {train[0]} list different row indices; compute them on the same pool.")
            norms = rows["norm"]
            zero = np.flatnonzero(norms == 0)
            if len(zero):
                raise ValueError(f"{train[c]}: row {int(rows['index'][zero[0]])} has a zero gradient feature.")
            total += weights[c] * ((rows["features"] @ means[c]) / norms[:, None])
        return {f"influence_{t}": total[:, col_of[t]].max(axis=1).astype(np.float32) for t in task_names}

    from datasets import Features, Value

    features = Features({"index": Value("int64"), **{f"influence_{t}": Value("float32") for t in task_names}})
    scores = base.map(
        score,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        features=features,
        keep_in_memory=cache_file_name is None,
        cache_file_name=cache_file_name,
        desc="influence",
    )
    scores.info.description = json.dumps(
        {
            "influence": {
                "train_stores": train,
                "tasks": tasks,
                "checkpoint_weights": weights,
                "checkpoints": [m.get("checkpoint") for m in metas],
                "learning_rates": [m.get("learning_rate") for m in metas],
                "projection": metas[0]["config"]["projection"],
                "preconditioner": metas[0]["config"]["preconditioner"],
                "num_validation": {t: {s: read_store_metadata(ps[0])["num_features"] for s, ps in subs.items()} for t, subs in tasks.items()},
                "skipped": metas[0].get("skipped", []),
                "pool_rows": metas[0]["num_rows"],
            }
        }
    )
    return scores


def provenance(scores) -> dict:
    """The JSON provenance that ``compute_influence``/``select`` attach to a score table (empty if none)."""
    try:
        return json.loads(scores.info.description or "{}")
    except (TypeError, ValueError):
        return {}
