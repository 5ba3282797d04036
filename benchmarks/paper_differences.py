"""How much each difference between the library default, the paper preset and the released ICONS code changes a
selection, measured on synthetic score tables (not tests; the exactness of the paper preset is tested in
tests/test_paper_preset.py).

For each table kind (continuous: normal scores; tie-heavy: integers in 0..4), task count and fraction, one
difference is switched at a time from the paper preset and the share of the selected rows that change is
reported (mean over ``--seeds`` tables):

* ``threshold 80``: a fixed 80th-percentile threshold instead of the one tied to the fraction (100 - 100 f);
* ``votes >``: a task votes above its threshold only (the paper's formula) instead of ``>=`` (the released code);
* ``released sort``: ties at the cut-off vote count broken by ``numpy.argsort`` (quicksort, as the released code)
  instead of the library's mean percentile rank then index;
* ``default rule``: the library default (``task_floor=1``, fixed 80, ``>``), for scale.

The size (``int(f N)`` in both) never differs. ``python benchmarks/paper_differences.py --rows 20000``
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def table(kind: str, rows: int, tasks: int, rng):
    from datasets import Dataset

    if kind == "continuous":
        cols = [rng.normal(size=rows).astype(np.float32) for _ in range(tasks)]
    else:
        cols = [rng.integers(0, 5, size=rows).astype(np.float32) for _ in range(tasks)]
    return Dataset.from_dict({"index": np.arange(rows), **{f"influence_t{j}": c for j, c in enumerate(cols)}}), cols


def released_sort(cols, fraction: float) -> np.ndarray:
    percent = round(100 * fraction, 10)
    k = int((percent / 100) * len(cols[0]))
    votes = np.sum([c >= np.percentile(c, 100 - percent) for c in cols], axis=0)
    chosen = np.zeros(len(votes), dtype=bool)
    chosen[np.argsort(votes)[-k:]] = True
    return chosen


def changed(a, b) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return float((a & ~b).sum() / max(1, a.sum()))


def measure(kind: str, rows: int, tasks: int, fraction: float, seeds: int) -> dict:
    from icons_hf import select

    out = {"threshold 80": [], "votes >": [], "released sort": [], "default rule": []}
    for seed in range(seeds):
        scores, cols = table(kind, rows, tasks, np.random.default_rng(seed))
        paper = select(scores, fraction=fraction, preset="paper")["selected"]
        out["threshold 80"].append(changed(paper, select(scores, fraction=fraction, preset="paper", threshold_percentile=80)["selected"]))
        out["votes >"].append(changed(paper, select(scores, fraction=fraction, preset="paper", threshold_inclusive=False)["selected"]))
        out["released sort"].append(changed(paper, released_sort(cols, fraction)))
        out["default rule"].append(changed(paper, select(scores, fraction=fraction)["selected"]))
    return {k: float(np.mean(v)) for k, v in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    print(f"share of the paper preset's selected rows that change ({args.rows} rows, mean of {args.seeds} tables)")
    print(f"{'table':<11} {'tasks':>5} {'fraction':>8} {'threshold 80':>12} {'votes >':>8} {'released sort':>13} {'default rule':>12}")
    for kind in ("continuous", "tie-heavy"):
        for tasks in (3, 10):
            for fraction in (0.05, 0.2, 0.6):
                r = measure(kind, args.rows, tasks, fraction, args.seeds)
                print(f"{kind:<11} {tasks:>5} {fraction:>8.2f} {r['threshold 80']:>12.1%} {r['votes >']:>8.1%} "
                      f"{r['released sort']:>13.1%} {r['default rule']:>12.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
