#!/usr/bin/env python
"""Why wrong answers rank as high as right ones on the real model: for the pool rows of each closed-answer task in
a finished real-model run (``replica_real.py``), the cosine of the row's gradient feature with the task's validation
examples that share the row's answer and with those that do not, and how often the validation example that gives
the row its balanced score (its highest within-pool percentile rank) shares the row's answer, for right and for
wrong answers. Writes ``<report_dir>/answer_direction.{md,json}``.

    python examples/replica/answer_direction.py                     # after replica_real.py, pool R-noisy
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from many_harness import read_json
from real_harness import Material

from icons_hf.ranks import percentile_ranks
from icons_hf.store import load_gradients

TASKS = ("sentiment", "capital", "month", "yesno")
KINDS = {"single": "right answer", "wrong": "wrong answer"}


def unit_features(path: str) -> np.ndarray:
    data = load_gradients(path).with_format("numpy")
    features = np.asarray(data["features"], dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def validation(run: dict, material: Material, task: str) -> tuple[np.ndarray, list[str]]:
    """The task's unit validation features (subtasks stacked in the run's order) and their answers."""
    spec = run["tasks"][task]
    if isinstance(spec, dict):
        return (np.concatenate([unit_features(path) for path in spec.values()]),
                [a for sub in spec for _, a in material.validation[task][sub]])
    return unit_features(spec), [a for _, a in material.validation[task]]


def measure(output_dir: str, pool: str, seeds: list[int], args: dict) -> dict:
    out: dict = {}
    for seed in seeds:
        folder = os.path.join(output_dir, f"seed{seed}", pool)
        rows = read_json(os.path.join(folder, "pool.json"))
        run = read_json(os.path.join(folder, "features", "icons_run.json"))["checkpoints"][-1]
        train = unit_features(run["train"])
        material = Material(seed, args["validation_per_task"], args["test_per_leaf"])
        for task in TASKS:
            val, answers = validation(run, material, task)
            cosine = train @ val.T
            best = np.stack([percentile_ranks(cosine[:, v]) for v in range(len(answers))], axis=1).argmax(axis=1)
            for kind in KINDS:
                entry = out.setdefault(task, {}).setdefault(kind, {"rows": 0, "best_shares": 0, "chance": 0.0,
                                                                   "cos_same": [], "cos_other": []})
                for i, row in enumerate(rows):
                    if row["kind"] != kind or row["tasks"] != [task]:
                        continue
                    given = row["messages"][1]["content"]
                    same = [v for v, a in enumerate(answers) if a == given]
                    other = [v for v, a in enumerate(answers) if a != given]
                    entry["rows"] += 1
                    entry["best_shares"] += int(answers[best[i]] == given)
                    entry["chance"] += len(same) / len(answers)
                    if same:
                        entry["cos_same"].append(float(cosine[i, same].mean()))
                    entry["cos_other"].append(float(cosine[i, other].mean()))
    return {task: {kind: {"rows": e["rows"], "best_shares_answer": e["best_shares"] / max(1, e["rows"]),
                          "chance": e["chance"] / max(1, e["rows"]),
                          "cosine_same_answer": float(np.mean(e["cos_same"])) if e["cos_same"] else None,
                          "cosine_other_answers": float(np.mean(e["cos_other"]))}
                   for kind, e in kinds.items()} for task, kinds in out.items()}


def markdown(result: dict, pool: str, seeds: list[int]) -> str:
    lines = [
        f"# The answer decides the gradient feature (real model, pool {pool}, seeds {seeds})", "",
        "Regenerate: `python examples/replica/answer_direction.py` (after `replica_real.py`).", "",
        "Per closed-answer task, the task's one-question pool rows with a right and with a wrong answer: the mean "
        "cosine of the row's gradient feature with the validation examples whose answer is the row's answer and with "
        "the others, and the share of rows whose balanced score (the highest within-pool percentile rank over the "
        "task's validation examples) comes from an example with the row's answer (chance: the share of validation "
        "examples with that answer).", "",
        "| task | rows | n | cosine, same answer | cosine, other answers | best example has the row's answer "
        "| chance |",
        "|---|---|---|---|---|---|---|"]
    for task, kinds in result.items():
        for kind, e in kinds.items():
            same = "–" if e["cosine_same_answer"] is None else f"{e['cosine_same_answer']:+.3f}"
            lines.append(f"| {task} | {KINDS[kind]} | {e['rows']} | {same} | {e['cosine_other_answers']:+.3f} | "
                         f"{e['best_shares_answer']:.0%} | {e['chance']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="replica_real_runs")
    parser.add_argument("--pool", default="R-noisy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--report_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    run_args = read_json(os.path.join(args.output_dir, "replica_args.json"))
    result = measure(args.output_dir, args.pool, args.seeds, run_args)
    base = os.path.join(args.report_dir, "answer_direction")
    with open(base + ".json", "w") as handle:
        json.dump({"pool": args.pool, "seeds": args.seeds, "tasks": result}, handle, indent=1)
    with open(base + ".md", "w") as handle:
        handle.write(markdown(result, args.pool, args.seeds))
    return result


if __name__ == "__main__":
    main()
