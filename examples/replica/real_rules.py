"""Selection rules of the real-model replica: the candidates of ``benchmarks/results/decision_rule.md``, each a
library call on the score tables (row kinds are never seen)."""

from __future__ import annotations

import math

import numpy as np

from icons_hf import select

RULES = {
    "default": "the library default: compute_influence(train, tasks) + select(scores, fraction=f)",
    "floor50": "balanced specialist, select(method='vote', task_floor=0.5)",
    "floor0": "balanced specialist, select(method='vote', task_floor=0) (votes alone)",
    "paper": "preset='paper' on both stages (mean-cosine specialist, votes at the 100(1-f) percentile, >=)",
    "gain": "balanced specialist, select(method='gain'): equal floors, each task's rows above its threshold "
            "ordered by the summed percentile rank over all tasks",
    "veto": "balanced specialist, select(method='veto'): votes among rows no task ranks in its bottom 5%",
    "rank": "balanced specialist, select(method='rank'): mean within-task percentile rank",
    "mix": "balanced specialist, select(method='mix'): per-task floors in proportion to the pool's task mix (rows "
           "at home in each task), each task's own top rows",
    "blend": "balanced specialist, select(method='random', task_floor=0.5): half equal per-task floors, half a "
             "seeded random sample",
    "random": "a uniformly random subset (seeded)",
}
RULE_NAMES = tuple(RULES)


def _selected(table) -> np.ndarray:
    return np.flatnonzero(np.asarray(table["selected"]))


def select_rows(rule: str, fraction: float, *, balanced, mean, seed: int) -> np.ndarray:
    """Sorted pool positions that ``rule`` keeps at ``fraction`` (``balanced``/``mean``: the score tables of the two
    specialists)."""
    calls = {
        "default": lambda: select(balanced, fraction=fraction),
        "floor50": lambda: select(balanced, fraction=fraction, task_floor=0.5),
        "floor0": lambda: select(balanced, fraction=fraction, task_floor=0.0),
        "paper": lambda: select(mean, fraction=fraction, preset="paper"),
        "gain": lambda: select(balanced, fraction=fraction, method="gain"),
        "veto": lambda: select(balanced, fraction=fraction, method="veto"),
        "rank": lambda: select(balanced, fraction=fraction, method="rank"),
        "mix": lambda: select(balanced, fraction=fraction, method="mix"),
        "blend": lambda: select(balanced, fraction=fraction, method="random", task_floor=0.5, seed=seed),
    }
    if rule == "random":
        n = len(balanced)
        return np.sort(np.random.default_rng([seed, 3]).choice(n, math.floor(fraction * n), replace=False))
    if rule not in calls:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULE_NAMES)}.")
    return _selected(calls[rule]())
