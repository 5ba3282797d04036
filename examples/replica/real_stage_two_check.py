#!/usr/bin/env python
"""What a stronger stage two changes on the real model: one finished (seed, pool) of ``replica_real.py`` trained
again with LoRA on more top layers and more steps, on the whole pool, on the family's random and default
selections, and on a random 20% of the pool's clean rows (which no rule can pick: row kinds are hidden). Exact
match per task as in the family. Writes ``<report_dir>/real_stage_two_check.{md,json}``.

    python examples/replica/real_stage_two_check.py                  # seed 0, R-noisy, top 4 layers, 120 steps

A diagnostic of one seed, not a replica: it says whether harmful rows hurt, and so whether a selection rule can
beat random, once the stage two learns the tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from many_harness import read_json
from real_harness import Worker, task_accuracy
from real_model import exact_match, tensorize, train_fixed_steps
from real_tasks import HARMFUL


def subsets(rows: list[dict], selections: dict, seed: int) -> dict[str, np.ndarray]:
    clean = np.array([i for i, r in enumerate(rows) if r["kind"] not in HARMFUL])
    return {"full": np.arange(len(rows)), "random": np.asarray(selections["random"]),
            "default": np.asarray(selections["default"]),
            "clean random": np.sort(np.random.default_rng([seed, 5]).choice(clean, len(rows) // 5, replace=False))}


def measure(args) -> dict:
    run_args = read_json(os.path.join(args.output_dir, "replica_args.json"))
    worker = Worker({**run_args, "output_dir": args.output_dir, "top": args.top})
    folder = worker.folder(args.seed, args.pool)
    rows = read_json(os.path.join(folder, "pool.json"))
    data = tensorize(worker.dataset(rows), worker.base()[1].pad_token_id)
    leaves, tests = worker.tests(args.seed)
    out = {}
    for name, positions in subsets(rows, read_json(os.path.join(folder, "selections.json"))["selections"],
                                   args.seed).items():
        started = time.perf_counter()
        model = worker.fresh_model(args.seed)
        subset = {k: v[torch.as_tensor(positions)] for k, v in data.items()}
        loss = train_fixed_steps(model, subset, steps=args.steps, batch_size=run_args["batch_size"],
                                 lr=run_args["learning_rate"], seed=args.seed)
        accuracy = task_accuracy(exact_match(model, tests, leaves))
        out[name] = {"rows": len(positions), "harmful_share": float(np.mean([rows[i]["kind"] in HARMFUL
                                                                              for i in positions])),
                     "loss": loss, "accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values()))),
                     "wall_s": time.perf_counter() - started}
    return out


def markdown(result: dict, args) -> str:
    tasks = list(next(iter(result.values()))["accuracy"])
    full = result["full"]["mean_accuracy"]
    lines = [f"# A stronger stage two on the real model (seed {args.seed}, {args.pool})", "",
             f"Regenerate: `python examples/replica/real_stage_two_check.py --seed {args.seed} --pool {args.pool} "
             f"--top {args.top} --steps {args.steps}` (after `replica_real.py`).", "",
             f"LoRA on the top {args.top} layers, {args.steps} steps of 16 rows (the family: top 2, 40 steps); the "
             "selections are the family's (features from its top-2 warmup). Relative: mean accuracy / the full "
             "pool's. One seed: a diagnostic, not a result with an error bar.", "",
             "| subset | rows | harmful share | " + " | ".join(tasks) + " | mean accuracy | relative |",
             "|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    for name, r in result.items():
        lines.append(f"| {name} | {r['rows']} | {r['harmful_share']:.0%} | "
                     + " | ".join(f"{100 * r['accuracy'][t]:.0f}" for t in tasks)
                     + f" | {100 * r['mean_accuracy']:.1f} | {100 * r['mean_accuracy'] / full:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="replica_real_runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", default="R-noisy")
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--report_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    result = measure(args)
    base = os.path.join(args.report_dir, "real_stage_two_check")
    with open(base + ".json", "w") as handle:
        json.dump({"arguments": vars(args), "subsets": result}, handle, indent=1)
    with open(base + ".md", "w") as handle:
        handle.write(markdown(result, args))
    return result


if __name__ == "__main__":
    main()
