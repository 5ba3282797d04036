"""The influence plan: the stores a score table is computed from, validated, and the validation side prepared.

:func:`plan_influence` checks the train stores (one per checkpoint, or the parts of one pool), the tasks'
validation stores and the checkpoint weights, reduces each task's validation features as the specialist asks
(:meth:`icons_hf.specialists.Specialist.reduce_validation`) into one ``dim x columns`` matrix per checkpoint, and
fingerprints everything that changes the scores (the cache key of :mod:`icons_hf.influence_cache`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from datasets.fingerprint import Hasher

from .features import PROJECTIONS
from .settings import NAME_PATTERN, FeatureSettings, InfluenceSettings
from .specialists import SPECIALISTS, Specialist
from .store import iter_store_batches, read_store_metadata

logger = logging.getLogger(__name__)

CACHE_VERSION = "icons_hf.influence/2"


def _as_list(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def _normalise_tasks(tasks: Mapping, n_ckpt: int) -> dict[str, dict[str, list[str]]]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks must be a non-empty mapping task name -> validation store path(s).")
    out = {}
    for task, spec in tasks.items():
        if not NAME_PATTERN.match(str(task)):
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


def store_name(parts: Sequence[str]) -> str:
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
    weights)``; ``checkpoint_weights`` come from :class:`~icons_hf.settings.InfluenceSettings`, which checked their
    values (non-negative, positive sum): here only their number is checked against the checkpoints'."""
    train = _train_parts(train)
    if not train:
        raise ValueError("train must name at least one train store.")
    tasks = _normalise_tasks(tasks, len(train))
    metas = [_merged_metadata(parts) for parts in train]
    if checkpoint_weights is None:
        weights = checkpoint_weights_from_stores([parts[0] for parts in train])
    else:
        if len(checkpoint_weights) != len(train):
            raise ValueError(
                f"checkpoint_weights={list(checkpoint_weights)} must hold {len(train)} non-negative numbers "
                "with a positive sum, one per train store."
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


def plan_influence(train, tasks: Mapping, config: InfluenceSettings) -> InfluencePlan:
    """Validates the inputs and builds the validation matrices (:class:`InfluencePlan`)."""
    spec = SPECIALISTS[config.specialist]
    train, tasks, metas, weights = resolve_inputs(train, tasks, config.checkpoint_weights)
    matrices, owners = validation_matrices(train, tasks, metas, spec)
    for c in range(1, len(train)):
        if metas[c]["num_features"] != metas[0]["num_features"] or metas[c]["num_rows"] != metas[0]["num_rows"]:
            raise ValueError(f"train stores {store_name(train[0])} and {store_name(train[c])} hold different rows; "
                             "compute them on the same pool.")
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
            _check_compatible(metas[c], read_store_metadata(path), store_name(parts), path)
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
    same_projection = settings.get("projection") == want["projection"]
    if same_projection and not PROJECTIONS[want["projection"]].uses_dim:
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


__all__ = ["CACHE_VERSION", "FEATURE_DEFINING", "InfluencePlan", "checkpoint_weights_from_stores",
           "feature_differences", "feature_provenance", "influence_provenance", "input_hash_columns",
           "warn_feature_preset",
           "plan_influence", "resolve_inputs", "store_name", "validation_matrices"]
