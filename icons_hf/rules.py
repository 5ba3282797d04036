"""Consensus rules: how the tasks' influence columns rank the pool's rows (the generalist).

A rule is one function registered with :func:`consensus_rule`; it receives a :class:`RuleInput` and returns a
:class:`Ranking`: the primary score (higher is better), an optional tie-break score, the exact keys the sort
uses, and any extra columns. :func:`icons_hf.select` keeps the best rows (after the optional per-task floors),
breaking the remaining ties by the tie-break and then by the ascending row ``index``. Adding a rule::

    @consensus_rule("median")
    def median(inputs):
        \"\"\"score(z) = median_k I_k(z).\"\"\"
        return Ranking.of(np.median(inputs.matrix, axis=1))

after which ``select(method="median")``, ``SelectionSettings(method="median")`` and ``icons-hf select --method
median`` accept it, and the dataset card and the report describe it (``card_text=``, or the docstring's first
sentence).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .ranks import mean_rank, percentile_rank_matrix


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
    floor_keys: np.ndarray | None = None  # rows x tasks: the order of each task's floor (None: its own scores)
    floor_weights: np.ndarray | None = None  # per task: its share of the floored rows (None: equal shares)

    @classmethod
    def of(cls, primary: np.ndarray) -> Ranking:
        """A ranking by one float score, ties broken by ascending index."""
        zeros = np.zeros(len(primary))
        return cls(primary=primary, primary_key=primary, tiebreak=zeros, tiebreak_key=zeros)


@dataclass(frozen=True)
class Rule:
    """A registered consensus rule: ``function(RuleInput) -> Ranking`` (calling the entry calls it) and how the
    card names it (``card_text``, a phrase that may use the selection's provenance fields, e.g. ``{task!r}``)."""

    name: str
    function: Callable[[RuleInput], Ranking]
    card_text: str
    task_floor: float = 0.0

    def __call__(self, inputs: RuleInput) -> Ranking:
        return self.function(inputs)

    def describe(self, selection: Mapping) -> str:
        """``card_text`` with the selection's provenance fields filled in."""
        return self.card_text.format_map(defaultdict(lambda: "?", selection))


RULES: dict[str, Rule] = {}
RULE_FLOORS: dict[str, float] = {}  # each rule's default task_floor


def consensus_rule(name: str, *, task_floor: float = 0.0, card_text: str | None = None):
    """Registers ``function(RuleInput) -> Ranking`` as the consensus rule ``name`` (its docstring holds the
    formula); ``task_floor`` is the share of the subset the rule reserves as per-task floors when ``select`` is not
    told; ``card_text`` is the phrase the dataset card and the report use for it (default: the docstring's first
    sentence)."""
    if not 0.0 <= task_floor <= 1.0:
        raise ValueError(f"task_floor={task_floor!r} of consensus rule {name!r} must be between 0 and 1.")

    def register(function):
        if name in RULES:
            raise ValueError(f"a consensus rule named {name!r} is already registered.")
        text = card_text or first_sentence(function.__doc__).replace("{", "{{").replace("}", "}}") or name
        RULES[name] = Rule(name, function, text, float(task_floor))
        RULE_FLOORS[name] = float(task_floor)
        return function

    return register


def first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring, on one line, in Markdown (the default description of a registry
    entry)."""
    text = " ".join((doc or "").split()).replace("``", "`")
    return text.split(". ")[0].rstrip(".")


def vote_thresholds(inputs: RuleInput) -> list:
    """``tau_k``: NumPy's linear-interpolation percentile of each task's scores, in the column's own dtype."""
    return column_thresholds(inputs.columns, inputs.percentile)


def column_thresholds(columns, percentile: float) -> list:
    """The ``percentile`` of each column (NumPy's linear interpolation), in the column's own dtype."""
    return [np.percentile(column, percentile) for column in columns]


def vote_hits(columns, thresholds, inclusive: bool) -> np.ndarray:
    """``rows x tasks`` booleans: task ``k`` votes for a row whose score is above ``tau_k`` (``>=`` when
    ``inclusive``). The one definition of a vote: :func:`vote` and the report (:mod:`icons_hf.report_numbers`)
    count with it."""
    hits = [(col >= t) if inclusive else (col > t) for col, t in zip(columns, thresholds, strict=True)]
    return np.stack(hits, axis=1) if hits else np.zeros((0, 0), dtype=bool)


@consensus_rule("vote", task_floor=1.0, card_text="ICONS consensus voting")
def vote(inputs: RuleInput) -> Ranking:
    """ICONS: ``votes(z) = sum_k 1[I_k(z) > tau_k]`` (``>=`` when ``inclusive``), ``tau_k`` the ``percentile`` of
    task ``k``'s scores; rows ranked by votes, ties by the mean within-task percentile rank, then by index."""
    thresholds = vote_thresholds(inputs)
    hits = vote_hits(inputs.columns, thresholds, inputs.inclusive)
    votes = hits.sum(axis=1, dtype=np.int64) if hits.size else np.zeros(len(inputs.index), dtype=np.int64)
    rank, rank_key = mean_rank(inputs.matrix)
    return Ranking(
        primary=votes.astype(np.float64), primary_key=votes, tiebreak=rank, tiebreak_key=rank_key,
        extra_columns={"votes": votes.astype(np.int32)},
        info={"thresholds": {t: float(v) for t, v in zip(inputs.task_names, thresholds, strict=True)},
              "threshold_percentile": float(inputs.percentile), "threshold_inclusive": bool(inputs.inclusive)},
        tiebreak_text="mean within-task percentile rank, then ascending index",
    )


@consensus_rule("mean", card_text="the mean of the per-task influence scores")
def mean(inputs: RuleInput) -> Ranking:
    """``score(z) = mean_k I_k(z)``, the raw task scores averaged."""
    return Ranking.of(inputs.matrix.mean(axis=1))


@consensus_rule("max", card_text="the maximum of the per-task influence scores")
def maximum(inputs: RuleInput) -> Ranking:
    """``score(z) = max_k I_k(z)``."""
    return Ranking.of(inputs.matrix.max(axis=1))


@consensus_rule("rank", card_text="the mean within-task percentile rank")
def rank(inputs: RuleInput) -> Ranking:
    """``score(z) = mean_k q_k(z)``, ``q_k`` the within-task percentile rank (``icons_hf.ranks``)."""
    primary, key = mean_rank(inputs.matrix)
    zeros = np.zeros(len(primary))
    return Ranking(primary=primary, primary_key=key, tiebreak=zeros, tiebreak_key=zeros)


@consensus_rule("norm", card_text="the mean of per-task z-scored influence scores")
def norm(inputs: RuleInput) -> Ranking:
    """``score(z) = mean_k (I_k(z) - mean I_k) / std I_k`` (a constant task is centred only)."""
    std = inputs.matrix.std(axis=0)
    std[std == 0] = 1.0
    return Ranking.of(((inputs.matrix - inputs.matrix.mean(axis=0)) / std).mean(axis=1))


@consensus_rule("task", card_text="the influence on the single task {task!r} (LESS-style)")
def single_task(inputs: RuleInput) -> Ranking:
    """``score(z) = I_t(z)`` for the one task ``t`` named by ``task=`` (LESS-style specialist selection)."""
    if inputs.task not in inputs.task_names:
        known = ", ".join(inputs.task_names)
        raise ValueError(f"method='task' needs task= one of: {known} (got {inputs.task!r}).")
    return Ranking.of(inputs.matrix[:, inputs.task_names.index(inputs.task)])


@consensus_rule("random", card_text="a uniformly random subset (seed {seed})")
def uniform(inputs: RuleInput) -> Ranking:
    """``score(z) ~ U(0, 1)`` drawn with ``seed``: a uniformly random subset."""
    return Ranking.of(np.random.default_rng(inputs.seed).random(len(inputs.index)))


# Below this within-task percentile rank a task vetoes a row (method "veto").
VETO_RANK = 0.05


@consensus_rule("gain", task_floor=1.0)
def gain(inputs: RuleInput) -> Ranking:
    """Floors filled by summed gain: ``q_k(z)`` the within-task percentile rank, ``gain(z) = sum_k q_k(z)``. Each
    task's floor takes, in turns, the rows above its vote threshold (``q_k`` over the ``percentile`` of ranks) in
    order of ``gain`` (then by index), and only then its other rows by its own rank; rows left after the floors
    go by ``gain``. A row that several tasks rank high (a conversation answering several tasks) comes first
    within each of those tasks' top rows, and no task takes a row it ranks below its threshold while it has
    rows above it."""
    q = percentile_rank_matrix(inputs.matrix)
    n, k = q.shape
    rank, total_key = mean_rank(inputs.matrix)
    total = rank * k  # sum_k q_k, equal for rows whose exact integer keys are equal
    above = q > inputs.percentile / 100.0
    # Rows above the threshold first (offset past any own rank), by gain; the rest by their own rank.
    keys = np.where(above, k + 1.0 + total[:, None], q)
    zeros = np.zeros(n)
    return Ranking(primary=total, primary_key=total_key, tiebreak=zeros, tiebreak_key=zeros, floor_keys=keys,
                   info={"gain_threshold_rank": inputs.percentile / 100.0},
                   tiebreak_text="ascending index")


@consensus_rule("veto")
def veto(inputs: RuleInput) -> Ranking:
    """Votes among unvetoed rows: ``votes(z)`` as in ``vote``, but a row that some task ranks in its bottom
    ``VETO_RANK`` (within-task percentile rank ``q_k(z) < 0.05``) gets ``-1`` and comes after every unvetoed row;
    ties by the mean within-task percentile rank, then by index. A row several tasks want is kept only if no task
    finds it among its most harmful rows."""
    ranking = vote(inputs)
    vetoed = (percentile_rank_matrix(inputs.matrix) < VETO_RANK).any(axis=1)
    votes = np.where(vetoed, -1, ranking.primary_key)
    return Ranking(
        primary=votes.astype(np.float64), primary_key=votes, tiebreak=ranking.tiebreak,
        tiebreak_key=ranking.tiebreak_key, extra_columns=ranking.extra_columns,
        info={**ranking.info, "veto_rank": VETO_RANK, "vetoed_rows": int(vetoed.sum())},
        tiebreak_text=ranking.tiebreak_text)


@consensus_rule("mix", task_floor=1.0)
def mix(inputs: RuleInput) -> Ranking:
    """Floors in proportion to the pool's task mix: a row's home task is the task that scores it highest,
    ``argmax_k I_k(z)`` (a tie goes to the first task), task ``k``'s share ``s_k`` is the fraction of the pool's
    rows at home in it, and its floor holds ``s_k`` of the floored rows (largest remainders, ties to the first
    task), its own top rows; rows left after the floors go by the mean within-task percentile rank, then by index.
    The subset keeps the pool's task mix as a random subset does, and each task's share is its own best rows. The
    home task compares scores across tasks, so the tasks' scores must share a scale, as the balanced specialist's
    percentile ranks do (within-task percentile ranks would not do: each is uniform over the pool, which pulls
    every estimate toward equal shares)."""
    n, k = inputs.matrix.shape
    counts = np.bincount(np.argmax(inputs.matrix, axis=1), minlength=k) if n else np.zeros(k, dtype=np.int64)
    shares = counts / max(1, n)
    primary, key = mean_rank(inputs.matrix)
    zeros = np.zeros(n)
    return Ranking(primary=primary, primary_key=key, tiebreak=zeros, tiebreak_key=zeros, floor_weights=shares,
                   info={"task_mix": {t: float(v) for t, v in zip(inputs.task_names, shares, strict=True)}})


__all__ = ["RULES", "RULE_FLOORS", "VETO_RANK", "Ranking", "Rule", "RuleInput", "column_thresholds", "consensus_rule",
           "first_sentence", "vote_hits", "vote_thresholds"]
