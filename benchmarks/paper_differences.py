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

The size (``int(f N)`` in both) never differs. Subtasks: on synthetic stores (a pool of random gradients and an
MME-like task of 13 subtasks, each with 8 validation gradients around its own direction at its own scale,
log-uniform over 20x), the rank correlation between the paper preset's ``"mean"`` score and the released code's
``"mean_released"`` one, and the share of the top 20% rows that change.
``python benchmarks/paper_differences.py --rows 20000``
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


def subtask_difference(rows: int, seed: int, root: str) -> tuple[float, float]:
    """(Spearman between the "mean" and "mean_released" scores of a 13-subtask task, share of its top 20% rows
    that change)."""
    import os

    from icons_hf import compute_influence
    from icons_hf.ranks import percentile_ranks
    from icons_hf.store import StoreWriter

    rng = np.random.default_rng(seed)
    dim = 64
    config = {"projection": {"kind": "identity", "dim": dim, "seed": 0}, "parameters": {"w": [dim]},
              "model_config": "bench", "weights": "bench", "preconditioner": {"feature": "sgd"}}

    def store(name, feats):
        writer = StoreWriter(os.path.join(root, name), config=config, num_rows=len(feats), shard_size=4096, dim=dim,
                             dtype="float32")
        for lo, hi in writer.open():
            writer.write_shard(lo, hi, np.arange(lo, hi), feats[lo:hi])
        return writer.finalize()

    train = store("train", rng.normal(size=(rows, dim)).astype(np.float32))
    subtasks = {}
    for s in range(13):
        direction, scale = rng.normal(size=dim), float(np.exp(rng.uniform(0, np.log(20))))
        subtasks[f"s{s}"] = store(f"s{s}", (scale * (direction + rng.normal(size=(8, dim)))).astype(np.float32))
    paper = np.asarray(compute_influence(train, {"mme": subtasks}, specialist="mean")["influence_mme"])
    released = np.asarray(compute_influence(train, {"mme": subtasks}, specialist="mean_released")["influence_mme"])
    spearman = float(np.corrcoef(percentile_ranks(paper), percentile_ranks(released))[0, 1])
    k = int(0.2 * rows)
    top_paper, top_released = set(np.argsort(-paper)[:k].tolist()), set(np.argsort(-released)[:k].tolist())
    return spearman, len(top_paper - top_released) / k


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
    import tempfile

    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as root:
            spearman, share = subtask_difference(args.rows, seed, root)
        print(f"subtasks (13, scales over 20x), seed {seed}: Spearman(mean, mean_released) {spearman:.3f}; "
              f"top 20% rows changed {share:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
