"""Consensus rules: how the tasks' influence columns rank the pool's rows (the generalist).

A rule is one function registered with :func:`consensus_rule`; it receives a :class:`RuleInput` and returns a
:class:`Ranking`: the primary score (higher is better), an optional tie-break score, the exact keys the sort
uses, and any extra columns. :func:`icons_hf.select` keeps the best rows (after the optional per-task floors),
breaking the remaining ties by the tie-break and then by the ascending row ``index``. Adding a rule::

    @consensus_rule("median")
    def median(inputs):
        \"\"\"score(z) = median_k I_k(z).\"\"\"
        return Ranking.of(np.median(inputs.matrix, axis=1))

after which ``select(method="median")`` and ``SelectionSettings(method="median")`` accept it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .ranks import mean_rank


@dataclass(frozen=True)
class RuleInput:
    """What a rule sees: ``matrix`` (rows x tasks, float64), ``columns`` (each task's scores in the table's own
    dtype, for thresholds computed as the released code computes them), ``task_names``, ``index`` (pool row
    indices), and the settings' ``task``, ``seed``, vote ``percentile`` and ``inclusive``."""

    matrix: np.ndarray
    columns: list[np.ndarray]
    task_names: list[str]
    index: np.ndarray
    percentile: float
    inclusive: bool = False
    task: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class Ranking:
    """``primary`` (reported as ``consensus``) and ``tiebreak`` (reported as ``tiebreak``) scores, their exact
    sort keys (descending), extra columns for the table, extra provenance, and how ties are broken in words."""

    primary: np.ndarray
    primary_key: np.ndarray
    tiebreak: np.ndarray
    tiebreak_key: np.ndarray
    extra_columns: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    tiebreak_text: str = "ascending index"

    @classmethod
    def of(cls, primary: np.ndarray) -> Ranking:
        """A ranking by one float score, ties broken by ascending index."""
        zeros = np.zeros(len(primary))
        return cls(primary=primary, primary_key=primary, tiebreak=zeros, tiebreak_key=zeros)


RULES: dict[str, Callable[[RuleInput], Ranking]] = {}


def consensus_rule(name: str):
    """Registers ``function(RuleInput) -> Ranking`` as the consensus rule ``name`` (its docstring holds the formula)."""

    def register(function):
        if name in RULES:
            raise ValueError(f"a consensus rule named {name!r} is already registered.")
        RULES[name] = function
        return function

    return register


def rule_names() -> tuple[str, ...]:
    """The registered consensus rules, in registration order."""
    return tuple(RULES)


def vote_thresholds(inputs: RuleInput) -> list:
    """``tau_k``: NumPy's linear-interpolation percentile of each task's scores, in the column's own dtype."""
    return [np.percentile(column, inputs.percentile) for column in inputs.columns]


@consensus_rule("vote")
def vote(inputs: RuleInput) -> Ranking:
    """ICONS: ``votes(z) = sum_k 1[I_k(z) > tau_k]`` (``>=`` when ``inclusive``), ``tau_k`` the ``percentile`` of
    task ``k``'s scores; rows ranked by votes, ties by the mean within-task percentile rank, then by index."""
    thresholds = vote_thresholds(inputs)
    hits = [(col >= t) if inputs.inclusive else (col > t) for col, t in zip(inputs.columns, thresholds)]
    votes = np.sum(hits, axis=0, dtype=np.int64) if hits else np.zeros(len(inputs.index), dtype=np.int64)
    rank, rank_key = mean_rank(inputs.matrix)
    return Ranking(
        primary=votes.astype(np.float64), primary_key=votes, tiebreak=rank, tiebreak_key=rank_key,
        extra_columns={"votes": votes.astype(np.int32)},
        info={"thresholds": {t: float(v) for t, v in zip(inputs.task_names, thresholds)},
              "threshold_percentile": float(inputs.percentile), "threshold_inclusive": bool(inputs.inclusive)},
        tiebreak_text="mean within-task percentile rank, then ascending index",
    )


@consensus_rule("mean")
def mean(inputs: RuleInput) -> Ranking:
    """``score(z) = mean_k I_k(z)``, the raw task scores averaged."""
    return Ranking.of(inputs.matrix.mean(axis=1))


@consensus_rule("max")
def maximum(inputs: RuleInput) -> Ranking:
    """``score(z) = max_k I_k(z)``."""
    return Ranking.of(inputs.matrix.max(axis=1))


@consensus_rule("rank")
def rank(inputs: RuleInput) -> Ranking:
    """``score(z) = mean_k q_k(z)``, ``q_k`` the within-task percentile rank (``icons_hf.ranks``)."""
    primary, key = mean_rank(inputs.matrix)
    zeros = np.zeros(len(primary))
    return Ranking(primary=primary, primary_key=key, tiebreak=zeros, tiebreak_key=zeros)


@consensus_rule("norm")
def norm(inputs: RuleInput) -> Ranking:
    """``score(z) = mean_k (I_k(z) - mean I_k) / std I_k`` (a constant task is centred only)."""
    std = inputs.matrix.std(axis=0)
    std[std == 0] = 1.0
    return Ranking.of(((inputs.matrix - inputs.matrix.mean(axis=0)) / std).mean(axis=1))


@consensus_rule("task")
def single_task(inputs: RuleInput) -> Ranking:
    """``score(z) = I_t(z)`` for the one task ``t`` named by ``task=`` (LESS-style specialist selection)."""
    if inputs.task not in inputs.task_names:
        known = ", ".join(inputs.task_names)
        raise ValueError(f"method='task' needs task= one of: {known} (got {inputs.task!r}).")
    return Ranking.of(inputs.matrix[:, inputs.task_names.index(inputs.task)])


@consensus_rule("random")
def uniform(inputs: RuleInput) -> Ranking:
    """``score(z) ~ U(0, 1)`` drawn with ``seed``: a uniformly random subset."""
    return Ranking.of(np.random.default_rng(inputs.seed).random(len(inputs.index)))


__all__ = ["RULES", "Ranking", "RuleInput", "consensus_rule", "rule_names", "vote_thresholds"]
