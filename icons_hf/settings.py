"""Settings of the three stages: one dataclass each, the single source of every default.

* :class:`FeatureSettings`: how per-example gradient features are computed and stored
  (:func:`icons_hf.compute_gradients`, :class:`icons_hf.IconsCallback`, ``icons-hf gradients``);
* :class:`InfluenceSettings`: how a task's validation examples score the pool
  (:func:`icons_hf.compute_influence`, ``icons-hf influence``);
* :class:`SelectionSettings`: how the tasks' scores become one subset (:func:`icons_hf.select`, ``icons-hf select``).

Each has named presets: ``"default"`` (the library's measured defaults) and ``"paper"`` (the released ICONS
rule, see the README's table of differences). A function takes ``preset=`` and/or ``settings=`` plus the usual
keyword arguments; a keyword argument given explicitly (not ``None``) overrides the preset's value::

    SelectionSettings.from_preset("paper", fraction=0.05)
    select(scores, preset="paper", fraction=0.05)          # the same settings

The settings are validated when built (``__post_init__``), written whole beside every result (``store.json``,
``selection.json``, the dataset card) and parsed by ``transformers.HfArgumentParser`` (the CLI and the example
recipes build their options from the fields' ``help`` metadata).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .features import FEATURE_TYPES, PROJECTIONS
from .rules import RULE_FLOORS
from .rules import RULES as RULE_REGISTRY
from .specialists import SPECIALISTS as SPECIALIST_REGISTRY

PRESETS = ("default", "paper")
# A task, subtask, sub-pool or checkpoint name: it names a score column (influence_<task>) and a store folder.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


def validate_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of: {', '.join(map(str, choices))}.")


def _positive_int(name: str, value, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{' or None' if allow_none else ''}.")


def _number_in(name: str, value, low: float, high: float, *, low_open: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"{name}={value!r} must be a number in {bracket}{low}, {high}]{' or None' if allow_none else ''}."
        )


def _help(text: str, **extra) -> dict:
    return {"metadata": {"help": text, **extra}}


class _Settings:
    """Shared behaviour: presets, explicit-argument overrides, JSON round trip."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {"default": {}}

    @classmethod
    def from_preset(cls, preset: str | None = "default", **overrides):
        """The preset's settings with ``overrides`` (arguments given as ``None`` keep the preset's value)."""
        preset = "default" if preset is None else preset
        if preset not in cls.presets:
            raise ValueError(
                f"preset={preset!r} is not known to {cls.__name__}; choose one of: {', '.join(cls.presets)}."
            )
        return cls(**{**cls.presets[preset], **cls._explicit(overrides)})

    @classmethod
    def resolve(cls, settings=None, preset: str | None = None, **overrides):
        """Settings for one call: ``settings`` (an instance or a mapping) or the ``preset``, then every argument
        that was given (not ``None``). Passing both ``settings`` and ``preset`` is refused (ambiguous)."""
        if settings is not None and preset is not None:
            raise ValueError(f"pass either settings= or preset= to choose the {cls.__name__}, not both.")
        if settings is None:
            return cls.from_preset(preset, **overrides)
        if isinstance(settings, Mapping):
            settings = cls.from_dict(settings)
        if not isinstance(settings, cls):
            raise TypeError(
                f"settings must be a {cls.__name__} (or a mapping of its fields), got {type(settings).__name__}."
            )
        explicit = cls._explicit(overrides)
        return dataclasses.replace(settings, **explicit) if explicit else settings

    @classmethod
    def _explicit(cls, overrides: Mapping) -> dict:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no setting {unknown[0]!r}; known: {', '.join(sorted(names))}.")
        return {k: v for k, v in overrides.items() if v is not None}

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting {unknown[0]!r}; known: {', '.join(sorted(names))}.")
        return cls(**values)

    def differences(self, other) -> dict[str, tuple]:
        """``name -> (self's value, other's value)`` for every setting that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs.get(k)) for k in mine if mine[k] != theirs.get(k)}


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass(frozen=True)
class FeatureSettings(_Settings):
    """How per-example gradient features are computed and stored (the warmup checkpoints' side)."""

    train_feature: str = field(default="sgd", **_help(
        "feature type of the pool (train) rows (icons_hf.features): 'sgd' plain gradients (default, as the released "
        "ICONS scripts) or 'adam' (the LESS map of the checkpoint's Adam state, as the ICONS/LESS papers); "
        "validation rows always use plain gradients", choices=FEATURE_TYPES))
    adam_variant: str = field(default="less", **_help(
        "Adam feature: 'less' m'/sqrt(v'+eps) (LESS released code) or 'torch' (bias-corrected AdamW update)",
        choices=("less", "torch")))
    parameters: str = field(default="trainable", **_help(
        "parameters whose gradients make the features: 'trainable' (every trainable parameter, each a linear layer: "
        "LoRA adapters and, e.g., a trainable multimodal projector) or 'lora' (only LoRA parameters, names holding "
        "'lora_', as the released ICONS code; the paper preset)", choices=("trainable", "lora")))
    projection: str = field(default="countsketch", **_help(
        "random projection (icons_hf.features): 'countsketch' (hashed, any device), 'rademacher' (dense "
        "TRAK-style), 'identity' (none)", choices=PROJECTIONS))
    dim: int = field(default=8192, **_help("projected feature dimension (ignored by 'identity')"))
    seed: int = field(default=0, **_help("projection seed"))
    batch_size: int = field(default=8, **_help("rows per forward/backward; features do not depend on it"))
    max_tokens_per_batch: int | None = field(default=None, **_help(
        "cap on padded tokens per batch (rows x longest row); bounds activation memory, features do not change"))
    dtype: str = field(default="float16", **_help("feature storage dtype", choices=("float16", "float32")))
    on_bad_row: str = field(default="error", **_help(
        "a row with no supervised token, a non-finite loss or an over-long input: 'error' (names the row) or 'skip' "
        "(recorded in the store)", choices=("error", "skip")))
    max_length: int | None = field(default=None, **_help("truncate longer rows to this many tokens (recorded)"))
    shard_size: int = field(default=4096, **_help(
        "rows per shard file: the unit of resumption and of work split between processes"))
    pad_token_id: int = field(default=0, **_help(
        "id used to pad input_ids (its value never matters: padding is masked)"))

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "default": {},
        # The released ICONS scripts: plain gradients of the LoRA parameters only, TRAK Rademacher projection at
        # dim 5120.
        "paper": {"train_feature": "sgd", "parameters": "lora", "projection": "rademacher", "dim": 5120},
    }

    def __post_init__(self):
        for name in ("train_feature", "adam_variant", "parameters", "projection", "dtype", "on_bad_row"):
            validate_choice(name, getattr(self, name), dataclasses.fields(self)[self._index(name)].metadata["choices"])
        _positive_int("dim", self.dim, minimum=1 if PROJECTIONS[self.projection].uses_dim else 0)
        _positive_int("seed", self.seed, minimum=0)
        _positive_int("batch_size", self.batch_size)
        _positive_int("max_tokens_per_batch", self.max_tokens_per_batch, allow_none=True)
        _positive_int("max_length", self.max_length, allow_none=True, minimum=2)
        _positive_int("shard_size", self.shard_size)
        _positive_int("pad_token_id", self.pad_token_id, minimum=0)

    @classmethod
    def _index(cls, name: str) -> int:
        return [f.name for f in dataclasses.fields(cls)].index(name)


@dataclass(frozen=True)
class InfluenceSettings(_Settings):
    """How a task's validation examples score every pool row (the specialist)."""

    specialist: str = field(default="balanced", **_help(
        "how a task's validation examples combine (icons_hf.specialists): 'balanced' (default; every example an "
        "equal quota of top rows), 'zscore', 'mean' (the ICONS paper's mean cosine, the paper preset), or "
        "'mean_released' (as 'mean', but a task given as subtasks averages its raw validation gradients, as the "
        "released ICONS scripts do for MME)", choices=SPECIALIST_REGISTRY))
    checkpoint_weights: list[float] | None = field(default=None, **_help(
        "explicit per-checkpoint weights (normalised to sum to one; kept as a tuple); default: the checkpoints' "
        "learning rates"))
    batch_size: int = field(default=4096, **_help("train rows scored per step (one Dataset.map batch)"))
    num_proc: int | None = field(default=None, **_help(
        "processes for the Dataset.map that scores the pool (None: this process); scores do not depend on it"))

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "default": {},
        # The released ICONS rule: mean cosine over a task's validation examples (normalised everywhere; see the
        # 'mean_released' specialist for the scripts' unnormalised MME subtasks).
        "paper": {"specialist": "mean"},
    }

    def __post_init__(self):
        validate_choice("specialist", self.specialist, tuple(SPECIALIST_REGISTRY))
        _positive_int("batch_size", self.batch_size)
        _positive_int("num_proc", self.num_proc, allow_none=True)
        if self.checkpoint_weights is not None:
            weights = tuple(float(w) for w in self.checkpoint_weights)
            if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(
                    f"checkpoint_weights={list(weights)} must be non-negative numbers with a positive sum."
                )
            object.__setattr__(self, "checkpoint_weights", weights)


DEFAULT_VOTE_FLOOR = RULE_FLOORS["vote"]  # select(method="vote") reserves the whole subset as per-task floors


@dataclass(frozen=True)
class SelectionSettings(_Settings):
    """How the tasks' influence columns become one subset (the generalist)."""

    method: str = field(default="vote", **_help(
        "consensus rule (icons_hf.rules): vote (ICONS), mean, max, rank, norm, task (one task's score), random",
        choices=RULE_REGISTRY))
    fraction: float = field(default=0.2, **_help("share of the pool to select: int(fraction x rows) rows"))
    num_rows: int | None = field(default=None, **_help("select exactly this many rows instead of a fraction"))
    threshold_percentile: float | None = field(default=80.0, **_help(
        "vote: per-task threshold at this percentile of the task's scores; None ties it to the size, "
        "100 - 100 x fraction (or 100 - 100 x num_rows / rows), as the released ICONS code does"))
    threshold_inclusive: bool = field(default=False, **_help(
        "vote: a task votes for a row whose score equals its threshold too (>=, the released code) instead of only "
        "above it (>, the paper's formula)"))
    task_floor: float | None = field(default=None, **_help(
        "share of the subset reserved as equal per-task floors of each task's own top rows (default: 1.0 for vote, "
        "0 otherwise; 0 with vote is the ICONS paper's rule)"))
    task: str | None = field(default=None, **_help("the task whose score ranks rows, for method 'task'"))
    seed: int = field(default=0, **_help("seed of method 'random'"))

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "default": {},
        # The released ICONS generalist: threshold tied to the fraction, votes on >=, no floor.
        "paper": {"method": "vote", "threshold_percentile": None, "threshold_inclusive": True, "task_floor": 0.0},
    }

    def __post_init__(self):
        validate_choice("method", self.method, tuple(RULE_REGISTRY))
        if self.num_rows is None:
            _number_in("fraction", self.fraction, 0.0, 1.0, low_open=True)
        else:
            _positive_int("num_rows", self.num_rows, minimum=0)
        _number_in("threshold_percentile", self.threshold_percentile, 0.0, 100.0, allow_none=True)
        _number_in("task_floor", self.task_floor, 0.0, 1.0, allow_none=True)
        _positive_int("seed", self.seed, minimum=0)
        if not isinstance(self.threshold_inclusive, bool):
            raise ValueError(f"threshold_inclusive={self.threshold_inclusive!r} must be True or False.")

    def rows_to_keep(self, n_total: int) -> int:
        """``num_rows``, or ``int(fraction x n_total)`` exactly as Python computes it (the released code's size)."""
        if self.num_rows is not None:
            if self.num_rows > n_total:
                raise ValueError(f"num_rows={self.num_rows} exceeds the {n_total} rows of the score table.")
            return int(self.num_rows)
        n_keep = int(self.fraction * n_total)
        if n_keep == 0:
            raise ValueError(
                f"fraction={self.fraction} of {n_total} rows selects no row (int({self.fraction} x {n_total}) = 0); "
                "raise fraction, or pass num_rows."
            )
        return n_keep

    def percentile(self, n_total: int | None = None) -> float:
        """The vote threshold's percentile: the fixed one; or, tied to the size as in the released code,
        ``100 - P`` with ``P = 100 x fraction`` rounded to 10 decimals (the ``--top_percent`` one would type, so
        0.29 gives 71.0, not 100 x (1 - 0.29) = 71.00000000000001); with ``num_rows``, ``100 - 100 x num_rows / N``."""
        if self.threshold_percentile is not None:
            return float(self.threshold_percentile)
        if self.num_rows is not None:
            if not n_total:
                raise ValueError("a threshold tied to num_rows needs the number of rows of the score table.")
            return 100.0 - 100.0 * self.num_rows / n_total
        return 100.0 - round(100.0 * float(self.fraction), 10)

    def floor_share(self) -> float:
        """``task_floor``, or the method's own default (``consensus_rule(..., task_floor=)``: 1.0 for vote and gain,
        0 for the others)."""
        if self.task_floor is not None:
            return float(self.task_floor)
        return RULE_FLOORS.get(self.method, 0.0)


__all__ = [
    "DEFAULT_VOTE_FLOOR", "NAME_PATTERN", "PRESETS", "FeatureSettings", "InfluenceSettings", "SelectionSettings",
    "validate_choice",
]
