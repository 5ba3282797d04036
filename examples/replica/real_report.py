"""The real-model replica's report: relative performance at 20% per pool and rule with paired differences against
random (choice seeds, held-out seeds, all), per-task accuracies, what each rule keeps (conversation and harmful
rows, answers per task) and how the specialists score wrong-answer and conversation rows."""

from __future__ import annotations

import json
import os

import numpy as np
from many_harness import read_json
from real_rules import RULES
from real_tasks import TARGETS


def _mean_std(values) -> list[float]:
    values = np.asarray(list(values), dtype=float)
    if not len(values):
        return [float("nan"), float("nan")]
    return [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")]


def relative(accuracy: dict, full: dict) -> float:
    """Mean accuracy over the target tasks divided by the full pool's (same seed)."""
    return float(np.mean([accuracy[t] for t in TARGETS]) / max(np.mean([full[t] for t in TARGETS]), 1e-9))


def candidates(results: dict) -> dict:
    """Per pool and rule, the per-seed relative performance (the input of examples/replica/decide_default.py) and
    what the rule keeps (``kept``, as :func:`candidates.kept` summarises it: conversation rows are the generalist
    rows; rows per task count the clean answers of the task)."""
    from candidates import kept

    def composition(c: dict) -> dict:
        return {"rows": c["rows"], "harmful": round(c["harmful_share"] * c["rows"]), "generalist": c["conversation"],
                "rows_per_task": c["answers_by_task"]}

    pools = {}
    for pool, entry in results["pools"].items():
        rules = [r for r in entry["rules"] if r != "full"]
        pools[pool] = {rule: {s: d["relative"] for s, d in entry["rules"][rule]["per_seed"].items()} for rule in rules}
        pools[pool]["kept"] = {rule: kept({s: composition(c[rule]) for s, c in entry["composition"].items()})
                               for rule in [*rules, "full"]}
    return {"family": "real", "choice_seeds": results["arguments"]["choice_seeds"], "pools": pools}


def _run(args, seed, pool, rule):
    path = os.path.join(args.output_dir, f"seed{seed}", pool, "runs", rule + ".json")
    return read_json(path) if os.path.isfile(path) else None


def collect(args, invocations) -> dict:
    """Per pool and rule: per-seed accuracies and relative performance (mean over tasks of accuracy / full-pool
    accuracy, same seed), paired differences against random, compositions, score diagnostics, timing."""
    rules = ["full", *args.rules]
    pools = {}
    for pool in args.pools:
        seeds = [s for s in args.seeds if all(_run(args, s, pool, r) for r in rules)]
        entry = {"seeds": seeds, "rules": {}, "composition": {}, "scores": {}}
        for rule in rules:
            per_seed = {}
            for s in seeds:
                res, full = _run(args, s, pool, rule), _run(args, s, pool, "full")
                # Mean accuracy over the tasks relative to the full pool's: a per-task ratio is undefined where the
                # stage-two budget teaches a task nothing from the whole pool (full-pool accuracy 0).
                rel = 100 * relative(res["accuracy"], full["accuracy"])
                per_seed[str(s)] = {"relative": float(rel), "accuracy": res["accuracy"],
                                    "mean_accuracy": float(np.mean(list(res["accuracy"].values())))}
            entry["rules"][rule] = {"per_seed": per_seed}
        for s in seeds:
            prep = read_json(os.path.join(args.output_dir, f"seed{s}", pool, "selections.json"))
            entry["composition"][str(s)] = prep["composition"]
            entry["scores"][str(s)] = prep["info"]["scores"]
        for data in entry["rules"].values():
            for group, members in (("all", seeds), ("choice", [s for s in seeds if s in args.choice_seeds]),
                                   ("held_out", [s for s in seeds if s not in args.choice_seeds])):
                rel = [data["per_seed"][str(s)]["relative"] for s in members]
                diff = [data["per_seed"][str(s)]["relative"] - entry["rules"]["random"]["per_seed"][str(s)]["relative"]
                        for s in members] if "random" in entry["rules"] else []
                data[group] = {"relative": _mean_std(rel), "vs_random": _mean_std(diff), "seeds": members}
        pools[pool] = entry
    return {"arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "rules": RULES,
            "pools": pools, "invocations": invocations}


def _fmt(ms) -> str:
    if ms[0] != ms[0]:
        return "n/a"
    return f"{ms[0]:.1f} (one seed)" if ms[1] != ms[1] else f"{ms[0]:.1f} +- {ms[1]:.1f}"


def _composition_means(entry, rule) -> dict:
    comps = [c[rule] for c in entry["composition"].values() if rule in c]
    if not comps:
        return {}
    return {"conversation_share": np.mean([c["conversation_share"] for c in comps]),
            "harmful_share": np.mean([c["harmful_share"] for c in comps]),
            "answers_by_task": {t: np.mean([c["answers_by_task"][t] for c in comps]) for t in TARGETS}}


def markdown(results: dict) -> str:
    args = results["arguments"]
    lines = ["# Real-model replica (SmolLM2-135M-Instruct)", "",
             f"Model: SmolLM2-135M-Instruct, all 30 decoder layers, LoRA r={args['lora_r']} on every linear layer "
             f"of the top {args['top']} (the layers below frozen). Pools of {args['pool_size']} rows; "
             f"{100 * args['fraction']:g}% selected; "
             f"stage two: {args['train_steps']} steps x {args['batch_size']} rows; exact match of greedy answers "
             f"on {args['test_per_leaf']} answer-balanced held-out questions per task or subtask. Relative "
             "performance: mean accuracy over the 7 tasks / the full pool's (a per-task ratio is undefined where the "
             "budget teaches a task nothing from the whole pool).", ""]
    for pool, entry in results["pools"].items():
        lines += [f"## {pool} (seeds {entry['seeds']})", "",
                  "| rule | relative, all seeds | vs random (paired), all | choice seeds vs random | held-out vs "
                  "random | conversation share | harmful share |", "|---|---|---|---|---|---|---|"]
        for rule, data in entry["rules"].items():
            comp = _composition_means(entry, rule)
            lines.append(
                f"| {rule} | {_fmt(data['all']['relative'])} | {_fmt(data['all']['vs_random'])} | "
                f"{_fmt(data['choice']['vs_random'])} | {_fmt(data['held_out']['vs_random'])} | "
                f"{100 * comp.get('conversation_share', float('nan')):.0f}% | "
                f"{100 * comp.get('harmful_share', float('nan')):.0f}% |")
        lines += ["", "Mean accuracy per task (all seeds) and clean answers per task kept:", "",
                  "| rule | " + " | ".join(TARGETS) + " | answers kept per task |",
                  "|---|" + "---|" * (len(TARGETS) + 1)]
        for rule, data in entry["rules"].items():
            accs = [np.mean([d["accuracy"][t] for d in data["per_seed"].values()]) for t in TARGETS]
            comp = _composition_means(entry, rule)
            kept = ", ".join(f"{t} {comp['answers_by_task'][t]:.0f}" for t in TARGETS) if comp else ""
            lines.append(f"| {rule} | " + " | ".join(f"{100 * a:.0f}" for a in accs) + f" | {kept} |")
        lines += ["", "Mean within-task percentile rank of the task's clean single rows, its wrong-answer rows and "
                  "the conversation rows that ask it (seed mean); Spearman of the score with the answer length:", "",
                  "| specialist | task | clean | wrong | conversation | Spearman(length) |",
                  "|---|---|---|---|---|---|"]
        for spec in ("balanced", "mean"):
            for task in TARGETS:
                got = [s[spec][task] for s in entry["scores"].values()]

                def avg(group, got=got):
                    vals = [g["pct_rank"][group] for g in got if g["pct_rank"][group] is not None]
                    return f"{np.mean(vals):.2f}" if vals else "-"

                rho = np.mean([g["spearman_length"] for g in got])
                lines.append(f"| {spec} | {task} | {avg('clean')} | {avg('wrong')} | {avg('conversation')} "
                             f"| {rho:+.2f} |")
        lines.append("")
    lines += ["## Rules", ""] + [f"- `{k}`: {v}" for k, v in results["rules"].items()] + [""]
    inv = results["invocations"]
    lines += ["## Cost", "", f"{len(inv)} invocation(s): " + "; ".join(
        f"{i['wall_s'] / 60:.1f} min wall, {i['cpu_s'] / 60:.1f} CPU-min, {i['jobs_run']} jobs run, "
        f"{i['jobs_cached']} cached ({i['workers']} workers, load {i['load_average_before'][0]:.1f} before)"
        for i in inv), ""]
    return "\n".join(lines)


def write(results: dict, report_dir: str, name: str) -> list[str]:
    os.makedirs(report_dir, exist_ok=True)
    paths = [os.path.join(report_dir, f"{name}.json"), os.path.join(report_dir, f"{name}.md"),
             os.path.join(report_dir, "candidates_real.json")]
    with open(paths[0], "w") as handle:
        json.dump(results, handle, indent=1)
    with open(paths[2], "w") as handle:
        json.dump(candidates(results), handle, indent=1)
    with open(paths[1], "w") as handle:
        handle.write(markdown(results))
    return paths
