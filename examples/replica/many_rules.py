"""Selection rules of the many-task replica. Every rule sees only the score tables and the train features, never
the row kinds. The library rules call :func:`icons_hf.select`; the others are a few lines of numpy here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from icons_hf import select


@dataclass(frozen=True)
class Rule:
    name: str
    help: str


RULES = (
    Rule("default", "the library default: compute_influence(train, tasks) + select(scores, fraction=f) "
                    "(balanced specialist, vote with task_floor=1: equal per-task floors)"),
    Rule("paper", "the ICONS paper's rule as released: compute_influence(..., preset='paper') (mean-cosine "
                  "specialist) + select(..., preset='paper') (votes at the 100(1-f) percentile, >=, no floor)"),
    Rule("floor0", "balanced specialist, vote, task_floor=0 (votes alone)"),
    Rule("floor25", "balanced specialist, vote, task_floor=0.25"),
    Rule("floor50", "balanced specialist, vote, task_floor=0.5"),
    Rule("floor-vote", "balanced specialist; equal per-task floors filling the whole subset, each task taking its "
                       "rows above its 80th-percentile threshold in order of votes (then its own score)"),
    Rule("gain", "balanced specialist, select(method='gain'): equal per-task floors, each task's rows above its "
                 "threshold ordered by the summed percentile rank over all tasks"),
    Rule("veto", "balanced specialist, select(method='veto'): votes among the rows no task ranks in its bottom 5%"),
    Rule("rank", "balanced specialist, select(method='rank'): mean within-task percentile rank, no floors"),
    Rule("mix", "balanced specialist, select(method='mix'): per-task floors in proportion to the pool's task mix "
                "(rows at home in each task), each task's own top rows"),
    Rule("blend", "balanced specialist, select(method='random', task_floor=0.5, seed=<the run's seed>): half the "
                  "subset equal per-task floors, half a seeded random sample"),
    Rule("random", "uniform random rows (seeded)"),
    Rule("kmeans", "coverage: k-means (k=32) of the unit train features of the last checkpoint, clusters sampled "
                   "evenly (random within a cluster), in the spirit of COINCIDE"),
)
RULE_NAMES = tuple(r.name for r in RULES)
# The candidates of benchmarks/results/decision_rule.md (besides ``full``), by the names the results use.
CANDIDATES = ("default", "floor50", "floor0", "paper", "gain", "veto", "rank", "mix", "blend", "random")


def score_matrix(table) -> tuple[list[str], np.ndarray]:
    """``(tasks, rows x tasks matrix)`` of an influence table (columns ``influence_<task>``)."""
    cols = [c for c in table.column_names if c.startswith("influence_")]
    return [c[len("influence_"):] for c in cols], np.stack([np.asarray(table[c], dtype=np.float64) for c in cols], 1)


def _selected(table) -> np.ndarray:
    return np.flatnonzero(np.asarray(table["selected"]))


def paper_selection(mean_table, fraction: float) -> np.ndarray:
    return _selected(select(mean_table, fraction=fraction, preset="paper"))


def floor_vote(mat: np.ndarray, n_keep: int, percentile: float = 80.0) -> np.ndarray:
    """Equal per-task floors over the whole subset, tasks taking turns; task k's order: rows above its threshold
    first, by votes (how many tasks' thresholds the row passes), then by its own score, then by row index."""
    n, k = mat.shape
    votes = (mat > np.percentile(mat, percentile, axis=0)[None, :]).sum(axis=1)
    above = mat > np.percentile(mat, percentile, axis=0)[None, :]
    index = np.arange(n)
    orders = [np.lexsort((index, -mat[:, j], -votes, ~above[:, j])) for j in range(k)]
    chosen = np.zeros(n, dtype=bool)
    pointers = [0] * k
    taken = 0
    while taken < n_keep:
        for j in range(k):
            if taken == n_keep:
                break
            while chosen[orders[j][pointers[j]]]:
                pointers[j] += 1
            chosen[orders[j][pointers[j]]] = True
            taken += 1
    return np.flatnonzero(chosen)


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 25) -> np.ndarray:
    """Cluster labels of the rows of ``x`` (Lloyd's algorithm, k-means++-style random start)."""
    rng = np.random.default_rng(seed)
    centers = x[rng.choice(len(x), k, replace=False)]
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        dist = (x * x).sum(1)[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None, :]
        labels = dist.argmin(axis=1)
        for c in range(k):
            members = x[labels == c]
            centers[c] = members.mean(axis=0) if len(members) else x[rng.integers(len(x))]
    return labels


def even_cluster_sample(labels: np.ndarray, n_keep: int, seed: int) -> np.ndarray:
    """``n_keep`` rows spread as evenly as possible over the clusters (a small cluster gives all its rows, the
    others share the rest), random within each cluster."""
    rng = np.random.default_rng([seed, 5])
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    quota = [0] * len(members)
    left = n_keep
    while left > 0:
        open_ = [i for i, m in enumerate(members) if quota[i] < len(m)]
        share = max(1, left // len(open_))
        for i in open_:
            give = min(share, len(members[i]) - quota[i], left)
            quota[i] += give
            left -= give
            if left == 0:
                break
    return np.sort(np.concatenate([m[:q] for m, q in zip(members, quota, strict=True)]))


def select_rows(rule: str, fraction: float, *, balanced, mean, features: np.ndarray, seed: int) -> np.ndarray:
    """Sorted pool positions that ``rule`` keeps at ``fraction`` (``balanced``/``mean``: the influence tables of
    the two specialists; ``features``: unit train features for the coverage baseline)."""
    n = len(balanced)
    n_keep = math.floor(fraction * n)
    if rule == "default":
        return _selected(select(balanced, fraction=fraction))
    if rule == "paper":
        return paper_selection(mean, fraction)
    if rule.startswith("floor") and rule[5:].isdigit():
        return _selected(select(balanced, fraction=fraction, method="vote", task_floor=int(rule[5:]) / 100))
    if rule in ("gain", "veto", "rank", "mix"):  # each rule's own default task_floor
        return _selected(select(balanced, fraction=fraction, method=rule))
    if rule == "blend":
        return _selected(select(balanced, fraction=fraction, method="random", task_floor=0.5, seed=seed))
    if rule == "floor-vote":
        return floor_vote(score_matrix(balanced)[1], n_keep)
    if rule == "random":
        return np.sort(np.random.default_rng([seed, 3]).choice(n, n_keep, replace=False))
    if rule == "kmeans":
        return even_cluster_sample(kmeans(features, 32, seed), n_keep, seed)
    raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULE_NAMES)}.")
