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
import copy
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
        out["threshold 80"].append(
            changed(paper, select(scores, fraction=fraction, preset="paper", threshold_percentile=80)["selected"])
        )
        out["votes >"].append(
            changed(paper, select(scores, fraction=fraction, preset="paper", threshold_inclusive=False)["selected"])
        )
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


# ------------------------------------------------------------------------------------ feature-side differences


def _band_rows(n: int, band: int | None, rng, vocab: int = 64, bands: int = 3) -> list[dict]:
    """Token rows whose tokens come mostly from one band of the vocabulary (a task's own kind of row), or from a
    random band per row (``band=None``: the pool); the last third of each row is supervised."""
    width = (vocab - 4) // bands
    rows = []
    for _ in range(n):
        b = int(rng.integers(bands)) if band is None else band
        length = int(rng.integers(8, 16))
        own = rng.integers(4 + b * width, 4 + (b + 1) * width, size=length)
        ids = np.where(rng.random(length) < 0.8, own, rng.integers(4, vocab, size=length)).tolist()
        cut = length - max(2, length // 3)
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def _mean_cosine(train: np.ndarray, tasks: dict, half: bool = False) -> dict:
    """The paper's specialist (mean cosine over a task's validation rows), normalised and multiplied in float32,
    or in float16 as the released code runs it (``half``)."""
    import torch

    dtype = torch.float16 if half else torch.float32
    unit = torch.nn.functional.normalize(torch.as_tensor(train).to(dtype), dim=1)
    out = {}
    for task, val in tasks.items():
        v = torch.nn.functional.normalize(torch.as_tensor(val).to(dtype), dim=1)
        out[task] = (unit @ v.T).float().mean(dim=1).numpy()
    return out


def _features(model, rows, root, name, **settings) -> np.ndarray:
    import os

    from datasets import Dataset

    from icons_hf import compute_gradients, load_gradients

    kwargs = {"preset": "paper", "dtype": "float32", "batch_size": 16, "show_progress": False, **settings}
    path = compute_gradients(model, Dataset.from_list(rows), output_dir=os.path.join(root, name), **kwargs)
    return np.asarray(load_gradients(path).with_format("numpy")[:]["features"], dtype=np.float32)


def _double_adapter(model) -> None:
    """Merge each LoRA adapter into its base weight and keep the adapter on top: weights W + 2 dW, as the
    released extraction loads the merged model and wraps it with the same adapter again."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                for adapter in module.active_adapters:
                    module.base_layer.weight += module.get_delta_weight(adapter)


def _compare(base: dict, other: dict, fraction: float = 0.2) -> tuple[float, float]:
    """(mean Spearman over tasks, share of the paper rule's selected rows that change) between two score sets."""
    from datasets import Dataset

    from icons_hf import select
    from icons_hf.ranks import percentile_ranks

    rho = np.mean([np.corrcoef(percentile_ranks(base[t]), percentile_ranks(other[t]))[0, 1] for t in base])
    tables = [Dataset.from_dict({"index": np.arange(len(base["t0"])), **{f"influence_{t}": s[t] for t in s}})
              for s in (base, other)]
    a, b = (np.asarray(select(t, fraction=fraction, preset="paper")["selected"]) for t in tables)
    return float(rho), changed(a, b)


def feature_side(rows: int, seed: int, root: str) -> dict[str, tuple[float, float]]:
    """Each feature-side difference of the released code, switched alone from the paper preset on a tiny Llama
    (2 layers x 32, LoRA r=4 on q/v with non-zero B) and a pool of ``rows`` rows of three kinds, with three tasks
    of 8 validation rows: ``(Spearman of the task scores, share of the 20% selection that changes)``."""
    import torch

    from icons_hf.testing import tiny_lora_llama

    rng = np.random.default_rng(seed)
    pool = _band_rows(rows, None, rng)
    tasks = {f"t{k}": _band_rows(8, k, rng) for k in range(3)}
    torch.manual_seed(seed)
    model = tiny_lora_llama(seed=seed)

    def scores(tag, m=model, half=False, **settings):
        train = _features(m, pool, root, f"{tag}-train", **settings)
        return _mean_cosine(train, {t: _features(m, r, root, f"{tag}-{t}", **settings) for t, r in tasks.items()},
                            half=half)

    base = scores("paper")
    out = {"TRAK's generator (another Rademacher matrix)": _compare(base, scores("seed", seed=1)),
           "fp16 normalisation and products": _compare(base, scores("half", half=True))}
    projector = model.base_model.model.model.layers[0].mlp.down_proj.weight
    projector.requires_grad_(True)  # a trainable non-LoRA layer, as LLaVA's LoRA recipe trains its projector
    out["all trainable parameters (projector included)"] = _compare(base, scores("trainable", parameters="trainable"))
    projector.requires_grad_(False)
    out["fp16 model"] = _compare(base, scores("fp16", m=copy.deepcopy(model).half()))
    doubled = copy.deepcopy(model)
    _double_adapter(doubled)
    out["adapter applied twice (W + 2 dW)"] = _compare(base, scores("double", m=doubled))
    return out


def zero_rows_case(rows: int = 40, fraction: float = 0.01) -> tuple[int, str]:
    """At ``int(f N) = 0`` the released sort keeps ``argsort(votes)[-0:]``: every row. The library refuses."""
    from datasets import Dataset

    from icons_hf import select

    cols = [np.random.default_rng(0).normal(size=rows) for _ in range(3)]
    kept = int(released_sort(cols, fraction).sum())
    try:
        select(Dataset.from_dict({"index": np.arange(rows), **{f"influence_t{j}": c for j, c in enumerate(cols)}}),
               fraction=fraction, preset="paper")
    except ValueError as err:
        return kept, str(err).split(";")[0]
    return kept, "accepted"


def tie_span(seeds: int) -> tuple[float, float, float]:
    """Smallest and largest share of the selected rows that the released sort picks differently (the cut-off
    vote count's ties), over table sizes 10..20,000, 3 and 10 tasks, fractions 1..60%, continuous and tie-heavy
    scores; and the share on tables of 10 rows."""
    from icons_hf import select

    spans, tiny = [], []
    for kind in ("continuous", "tie-heavy"):
        for rows in (10, 100, 1000, 20000):
            for tasks in (3, 10):
                for fraction in (0.01, 0.05, 0.2, 0.6):
                    if int(fraction * rows) == 0:
                        continue
                    shares = []
                    for seed in range(seeds):
                        scores, cols = table(kind, rows, tasks, np.random.default_rng(seed))
                        paper = select(scores, fraction=fraction, preset="paper")["selected"]
                        shares.append(changed(paper, released_sort(cols, fraction)))
                    (tiny if rows == 10 else spans).append(float(np.mean(shares)))
    return min(spans), max(spans), max(tiny)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--feature-rows", type=int, default=600, help="pool rows of the feature-side measurement")
    parser.add_argument("--only", choices=("tables", "features"), default=None,
                        help="run one half: the selection tables, or the feature-side and tie/size cases")
    args = parser.parse_args(argv)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    if args.only != "tables":
        features_report(args)
    if args.only == "features":
        return 0
    print(f"share of the paper preset's selected rows that change ({args.rows} rows, mean of {args.seeds} tables)")
    print(f"{'table':<11} {'tasks':>5} {'fraction':>8} {'threshold 80':>12} {'votes >':>8} {'released sort':>13} "
          f"{'default rule':>12}")
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


def features_report(args) -> None:
    import tempfile

    low, high, tiny = tie_span(args.seeds)
    print(f"released sort vs library tie-break: {low:.1%} to {high:.1%} of the selected rows (tables of 100 to "
          f"20000 rows), up to {tiny:.0%} on tables of 10 rows")
    kept, said = zero_rows_case()
    print(f"int(f N) = 0 (40 rows at 1%): the released sort keeps {kept} of 40 rows; the library: {said}")
    print(f"feature-side differences, switched alone from the paper preset (tiny Llama, {args.feature_rows} rows, "
          "3 tasks): Spearman of task scores, share of the 20% selection that changes")
    results = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as root:
            results.append(feature_side(args.feature_rows, seed, root))
    for name in results[0]:
        rho = [r[name][0] for r in results]
        moved = [r[name][1] for r in results]
        print(f"  {name:<48} Spearman {min(rho):.3f}-{max(rho):.3f}  selection changed {min(moved):.1%}-"
              f"{max(moved):.1%}")


if __name__ == "__main__":
    sys.exit(main())
