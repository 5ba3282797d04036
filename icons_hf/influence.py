"""Specialist scores: per-task influence of every training row, as a ``Dataset.map`` over the train stores.

With checkpoints ``c`` of weight ``w_c``, a pool row ``z`` and a validation example ``v`` of task ``k`` have the
weighted cosine ``c_v(z) = sum_c w_c cos(g_z^c, g_v^c)``. The *specialist* (:mod:`icons_hf.specialists`, a
registry) combines a task's examples: ``"balanced"`` (default; max over examples of within-pool percentile
ranks), ``"zscore"``, ``"mean"`` (the ICONS paper, following LESS; the paper preset) and ``"mean_released"`` (the
released scripts' unnormalised MME subtasks). Every default comes from :class:`icons_hf.settings.InfluenceSettings`.

Why ``"balanced"`` is the default: in the easy-VQA replica (``examples/replica``, README) the mean specialist's
selections drift toward one answer and, with the other defaults, lose to random; the balanced one does not.

The stages live in three modules: :mod:`icons_hf.influence_plan` (inputs validated, validation matrices,
fingerprint), :mod:`icons_hf.influence_scoring` (the map over the pool) and :mod:`icons_hf.influence_cache` (the
result file and its record).

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

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import pyarrow as pa
from datasets import Dataset

from .influence_cache import load_cached, result_path, write_sidecar, write_table
from .influence_plan import InfluencePlan, feature_provenance, influence_provenance, plan_influence, warn_feature_preset
from .influence_scoring import (
    IDENTITY_COLUMNS,
    PoolDataset,
    combine_examples,
    cosine_folder,
    create_cosine_file,
    pool_dataset,
    score_batch,
)
from .provenance import Provenance
from .ranks import TASK_PREFIX
from .settings import InfluenceSettings

logger = logging.getLogger(__name__)


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
    target = result_path(plan.fingerprint, plan.train[0][0], cache_file_name)
    cached = load_cached(target, plan.fingerprint)
    features = feature_provenance(plan.metas[0])
    warn_feature_preset(features, preset)
    if cached is not None:
        logger.info("influence served from cache %s", target)
        return cached
    scores = score_pool(plan, target, work_dir, cache_file_name)
    info = {"influence": influence_provenance(plan.train, plan.tasks, plan.weights, plan.metas,
                                              specialist=plan.specialist.name, settings=config.to_dict(),
                                              fingerprint=plan.fingerprint),
            "features": features}
    files = [f["filename"] for f in scores.cache_files]
    write_sidecar(target, {"fingerprint": plan.fingerprint, "files": files, "provenance": info})
    return load_cached(target, plan.fingerprint) if files else Provenance.from_dict(info).attach(scores)


def score_pool(plan: InfluencePlan, target: str, work_dir, cache_file_name):
    """The score table, written to ``target``: by the row-wise map, or by the per-example map and column step."""
    pools = [pool_dataset(parts) for parts in plan.train]
    if plan.n_rows == 0:  # Dataset.map returns an empty dataset unchanged
        hashes = {c: pa.array([], pa.string()) for c in IDENTITY_COLUMNS if c in pools[0].data.column_names}
        empty = {**hashes, **{f"{TASK_PREFIX}{t}": pa.array([], pa.float32()) for t in plan.task_names}}
        return write_table(pa.table({"index": pa.array([], pa.int64()), **empty}), target)
    if plan.specialist.per_example:
        folder = cosine_folder(work_dir, cache_file_name, 4 * len(plan.owners) * plan.n_rows)
        return score_per_example(plan, pools, target, folder)
    return map_pool(plan, pools, {"cache_file_name": target})


def map_pool(plan: InfluencePlan, pools: Sequence[PoolDataset], target: Mapping, cosine_file: str | None = None):
    """Runs :func:`score_batch` over checkpoint 0's pool (``target``: ``cache_file_name`` of the map)."""
    kwargs = {"pools": pools, "matrices": plan.matrices, "weights": plan.weights, "specialist": plan.specialist.name,
              "columns_of": plan.columns_of(), "cosine_file": cosine_file, "n_rows": plan.n_rows}
    return pools[0].data.map(
        score_batch, batched=True, batch_size=plan.settings.batch_size, with_indices=True, fn_kwargs=kwargs,
        num_proc=plan.settings.num_proc, load_from_cache_file=False, new_fingerprint=plan.fingerprint,
        desc="influence", **target,
    ).with_format(None)


def score_per_example(plan: InfluencePlan, pools: Sequence[PoolDataset], target: str | None, folder: str):
    """Per-example specialists: the map writes the cosine file (and the index), then each task's columns are
    combined one column at a time and the table is written to ``target``."""
    temp = tempfile.mkdtemp(prefix="icons_cosines_", dir=folder)
    try:
        cosine_file = create_cosine_file(temp, len(plan.owners), plan.n_rows)
        rows = map_pool(plan, pools, {"cache_file_name": os.path.join(temp, "rows.arrow")}, cosine_file)
        columns = combine_examples(cosine_file, plan)
        keep = rows.with_format("arrow")[:]
        identity = (
            {"index": keep.column("index").cast(pa.int64())} if len(keep) else {"index": pa.array([], pa.int64())}
        )
        for column in IDENTITY_COLUMNS:
            if column in keep.column_names:
                identity[column] = keep.column(column)
        scores = {f"{TASK_PREFIX}{t}": pa.array(col, pa.float32()) for t, col in columns.items()}
        table = pa.table({**identity, **scores})
        if target is None:
            return Dataset(table)
        return write_table(table, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


__all__ = ["compute_influence"]
