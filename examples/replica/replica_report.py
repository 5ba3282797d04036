"""Tables and figures of the replica: collects the per-run results of an output folder into one JSON, a Markdown
page and two PNG figures."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict

import numpy as np
from candidates import summarise as summarise_candidates
from replica_harness import ALL_ANSWERS, ANSWERS, KIND_HELP, KINDS, POOLS, pool_dir, run_key, seed_dir

TASKS = ("shape", "color", "yesno")


def _read(path):
    with open(path) as handle:
        return json.load(handle)


def _mean_std(values) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        return [float("nan"), float("nan")]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return [float(np.mean(values)), std]


def _entropy(counts) -> float:
    counts = np.asarray([c for c in counts if c > 0], dtype=np.float64)
    if len(counts) <= 1:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def answer_balance(answer_counts: dict) -> dict:
    """Per answer type: normalised entropy of the answers (1 = every answer equally often), and the yes share."""
    out = {}
    for task, answers in ANSWERS.items():
        counts = [answer_counts.get(a, 0) for a in answers]
        out[f"{task}_entropy"] = _entropy(counts) / math.log(len(answers)) if sum(counts) else float("nan")
    yes, no = answer_counts.get("yes", 0), answer_counts.get("no", 0)
    out["yes_share"] = yes / (yes + no) if yes + no else float("nan")
    out["yesno_skew"] = abs(2 * out["yes_share"] - 1) if yes + no else float("nan")
    return out


def collect(args, plan, timing, invocations=()) -> dict:
    """Everything the report shows, from the output folder. ``invocations`` are the timings of every run of the
    script on this output folder; the report's cost is the latest one that computed every job itself."""
    runs, stage1, diagnostics, compositions = [], {}, defaultdict(dict), defaultdict(lambda: defaultdict(list))
    for seed in args.seeds:
        stage1[seed] = _read(os.path.join(seed_dir(args.output_dir, seed), "stage1.json"))
        for pool in args.pools:
            folder = pool_dir(args.output_dir, seed, pool)
            diagnostics[pool][seed] = _read(os.path.join(folder, "diagnostics.json"))
            selections = _read(os.path.join(folder, "selections.json"))
            for rule, fraction in plan[pool]:
                key = run_key(rule, fraction)
                runs.append(_read(os.path.join(folder, "runs", f"{key}.json")))
                compositions[pool][key].append(selections[key]["composition"])
    summary = {pool: summarise(pool, [r for r in runs if r["pool"] == pool], args.seeds) for pool in args.pools}
    return {
        "arguments": asdict(args),
        "timing": timing,
        "fresh_run_timing": next(
            (t for t in reversed(list(invocations)) if t["jobs_run"] and not t["jobs_cached"]), None
        ),
        "pools": {p: {"tasks": list(POOLS[p].tasks), "mix": POOLS[p].mix, "rows": args.pool_size} for p in args.pools},
        "kinds": KIND_HELP,
        "stage1": {str(s): v for s, v in stage1.items()},
        "runs": runs,
        "summary": summary,
        "composition": {p: {k: average_composition(v) for k, v in c.items()} for p, c in compositions.items()},
        "features": feature_summary(diagnostics),
        "diagnostics": {p: {str(s): d for s, d in v.items()} for p, v in diagnostics.items()},
        "targets": targets(summary, args),
    }


def summarise(pool: str, runs: list, seeds) -> dict:
    """Per run key: per-task accuracy and relative performance (mean over the pool's tasks of acc / full acc),
    each as [mean, sample std] over seeds, plus the per-seed values."""
    tasks = POOLS[pool].tasks
    full = {r["seed"]: r["accuracy"] for r in runs if r["rule"] == "full"}
    by_key = defaultdict(dict)
    for r in runs:
        by_key[run_key(r["rule"], r["fraction"])][r["seed"]] = r
    out = {}
    for key, per_seed in by_key.items():
        any_run = next(iter(per_seed.values()))
        rel = {s: _relative(r["accuracy"], full[s], tasks) for s, r in per_seed.items()}
        out[key] = {
            "rule": any_run["rule"],
            "fraction": any_run["fraction"],
            "rows": int(np.mean([r["rows"] for r in per_seed.values()])),
            "accuracy": {t: _mean_std([r["accuracy"][t] for r in per_seed.values()]) for t in TASKS},
            "relative": _mean_std(list(rel.values())),
            "relative_per_seed": {str(s): v for s, v in sorted(rel.items())},
            "seeds": len(per_seed),
        }
    return out


def _relative(accuracy: dict, full: dict, tasks) -> float:
    """Mean over tasks of accuracy / full-pool accuracy (tasks where the full pool scored 0 are left out)."""
    ratios = [accuracy[t] / full[t] for t in tasks if full[t] > 0]
    return float(np.mean(ratios)) if ratios else float("nan")


def average_composition(items: list) -> dict:
    """Shares (of the subset's rows) averaged over seeds: question type, answer, hidden kind; answer balance."""
    def shares(field):
        keys = sorted({k for c in items for k in c[field]})
        return {k: float(np.mean([c[field].get(k, 0) / max(1, c["rows"]) for c in items])) for k in keys}

    balance = [answer_balance(c["answer"]) for c in items]
    return {
        "rows": float(np.mean([c["rows"] for c in items])),
        "question_type": shares("question_type"),
        "answer": shares("answer"),
        "kind": shares("kind"),
        "balance": {k: _nanmean([b[k] for b in balance]) for k in balance[0]},
    }


def _nanmean(values) -> float:
    """Mean of the values that are defined (a subset without, e.g., yes/no rows has no yes share); NaN if none."""
    defined = [float(v) for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def feature_summary(diagnostics) -> dict:
    """Adam (LESS) vs SGD train features, over seeds, pools and checkpoints."""
    rows = [d for per_pool in diagnostics.values() for diag in per_pool.values() for d in diag["adam_terms"]]
    projected = {
        kind: [v for per_pool in diagnostics.values() for diag in per_pool.values()
               for v in diag["pairwise_cosine_projected"][kind]]
        for kind in ("adam", "sgd")
    }
    return {
        "momentum_share": _mean_std([d["momentum_share"] for d in rows]),
        "momentum_cosine": _mean_std([d["momentum_cosine"] for d in rows]),
        "pairwise_cosine_adam": _mean_std([d["pairwise_cosine_adam"] for d in rows]),
        "pairwise_cosine_sgd": _mean_std([d["pairwise_cosine_sgd"] for d in rows]),
        "pairwise_cosine_projected_adam": _mean_std(projected["adam"]),
        "pairwise_cosine_projected_sgd": _mean_std(projected["sgd"]),
        "measurements": len(rows),
    }


def targets(summary, args) -> dict:
    """For every rule at the compare fraction: beats random by more than one std? keeps >= 95% of full?"""
    out = {}
    for pool, per_key in summary.items():
        random_key = run_key("random", args.compare_fraction)
        if random_key not in per_key:
            continue
        rnd = per_key[random_key]
        out[pool] = {}
        for entry in per_key.values():
            if entry["fraction"] != args.compare_fraction or entry["rule"] in ("random", "full"):
                continue
            out[pool][entry["rule"]] = {
                **_against_random(entry, rnd, None),
                "is_default": entry["rule"] == args.default_rule,
                "is_paper": entry["rule"] == args.paper_rule,
            }
            holdout = [s for s in getattr(args, "holdout_seeds", []) if s in args.seeds]
            if holdout:
                out[pool][entry["rule"]]["holdout_seeds"] = holdout
                out[pool][entry["rule"]]["holdout"] = _against_random(entry, rnd, holdout)
    return out


def _against_random(entry: dict, rnd: dict, seeds) -> dict:
    """Relative performance of a rule and of random over ``seeds`` (all when None), and the two targets."""
    per_rule, per_random = entry["relative_per_seed"], rnd["relative_per_seed"]
    seeds = [s for s in per_rule if s in per_random and (seeds is None or int(s) in seeds)]
    rel, base = _mean_std([per_rule[s] for s in seeds]), _mean_std([per_random[s] for s in seeds])
    return {
        "relative": rel,
        "random": base,
        "difference": _mean_std([per_rule[s] - per_random[s] for s in seeds]),
        "beats_random_by_more_than_one_std": bool(rel[0] - base[0] > max(rel[1], base[1])),
        "at_least_95_percent_of_full": bool(rel[0] >= 0.95),
    }


# ------------------------------------------------------------------------------------------------- writing


def _pm(pair, scale=100.0, digits=1) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _rule_rows(results, pool, keys):
    summary, comp = results["summary"][pool], results["composition"][pool]
    tasks = results["pools"][pool]["tasks"]
    rows = []
    for key in keys:
        e, c = summary[key], comp[key]
        rows.append([
            f"`{e['rule']}`", f"{e['fraction']:g}",
            *[_pm(e["accuracy"][t]) + ("" if t in tasks else " (not a target)") for t in TASKS],
            _pm(e["relative"]),
            f"{c['kind'].get('clean', 0) * 100:.0f}%",
        ])
    return rows


def markdown(results) -> str:
    args = results["arguments"]
    first = args["pools"][0]
    cf = args["compare_fraction"]
    lines = [
        "# Replica: does an ICONS subset beat a random one?",
        "",
        "Regenerate everything on this page with one command (it resumes from `--output_dir` when interrupted;",
        "cost on 2 CPU cores under *Cost*):",
        "",
        "```",
        "python examples/replica/replica.py",
        "```",
        "",
        *summary_lines(results),
        "",
        "## Setup",
        "",
        "easy-VQA (64x64 images of one coloured shape) with three target tasks: **shape**, **color** and **yes/no**",
        "questions. Per seed: a base model whose vision side is trained first (shape/colour of the train-split",
        "images, then captions and clean questions on images never in the pool); a pool of "
        f"{args['pool_size']} questions on other images with harmful rows mixed in; a LoRA warmup on "
        f"{args['warmup_fraction']:.0%} of the pool with `transformers.Trainer` + `IconsCallback` "
        f"({args['checkpoints']} checkpoints, Adam and SGD features, dim {args['dim']}); then for every rule the same",
        "model (base + fresh LoRA on the language model + projector, same seed) trained for "
        f"{args['train_steps']} steps",
        f"of batch {args['batch_size']} on the rule's rows, and scored on {args['test_per_task']} held-out test "
        "questions per",
        "task (answer-balanced, disjoint from the validation rows). Prediction: the argmax over the 13 easy-VQA",
        "answers at the answer position; score: the shipped `exact_match` metric. **Relative performance** = mean",
        "over the pool's target tasks of accuracy / full-pool accuracy (same seed), then mean ± sample std over",
        f"{len(args['seeds'])} seeds. Validation: {args['validation_per_task']} answer-balanced rows per task.",
        "",
        "Pools (row kinds are hidden from every rule and only counted here):",
        "",
    ]
    kind_rows = [[f"`{k}`", results["kinds"][k],
                  *[f"{results['pools'][p]['mix'].get(k, 0):.0%}" for p in args["pools"]]]
                 for k in KINDS]
    lines += _table(["kind", "what it is", *[f"pool {p}" for p in args["pools"]]], kind_rows)
    targets = "; ".join(f"pool {p}: {', '.join(results['pools'][p]['tasks'])}" for p in args["pools"])
    lines += ["", "Target tasks: " + targets, ""]

    summary = results["summary"][first]
    lines += [f"## Pool {first}: relative performance by fraction", "",
              f"![relative performance vs fraction]({results['figure_names']['main']})", ""]
    header = ["fraction", *[f"`{r}`" for r in args["sweep_rules"]]]
    frows = []
    for f in args["fractions"]:
        frows.append([f"{f:.0%}", *[_pm(summary[run_key(r, f)]["relative"]) for r in args["sweep_rules"]]])
    lines += _table(header, frows)
    lines += ["", "Relative performance in %, mean ± std over seeds (100 = the full pool).", ""]

    keys = [run_key("full", 1.0)] + sorted(
        (k for k, e in summary.items() if e["fraction"] == cf), key=lambda k: -summary[k]["relative"][0])
    lines += [f"## Pool {first}: every rule at {cf:.0%}", ""]
    lines += _table(["rule", "fraction", *[f"{t} acc %" for t in TASKS], "relative %", "clean rows"],
                    _rule_rows(results, first, keys))
    lines += ["", _rule_legend(), ""]

    for pool in args["pools"][1:]:
        s = results["summary"][pool]
        at_cf = sorted((k for k, e in s.items() if e["fraction"] == cf), key=lambda k: -s[k]["relative"][0])
        keys = [run_key("full", 1.0), *at_cf]
        lines += [f"## Pool {pool} (targets: {', '.join(results['pools'][pool]['tasks'])}) at {cf:.0%}", ""]
        lines += _table(["rule", "fraction", *[f"{t} acc %" for t in TASKS], "relative %", "clean rows"],
                        _rule_rows(results, pool, keys))
        lines.append("")

    lines += [f"## Targets at {cf:.0%}", "",
              f"The library's default rule is `{args['default_rule']}`. *Beats random* means the difference of the",
              "means exceeds the larger of the two standard deviations; the paired difference (rule − random, per",
              "seed) is shown too.", ""]
    trows = []
    for pool, per_rule in results["targets"].items():
        for rule, t in sorted(per_rule.items(), key=lambda x: -x[1]["relative"][0]):
            mark = " (default)" if t["is_default"] else " (paper)" if t.get("is_paper") else ""
            trows.append([pool, f"`{rule}`" + mark, _pm(t["relative"]),
                          _pm(t["random"]), _pm(t["difference"]),
                          "yes" if t["beats_random_by_more_than_one_std"] else "no",
                          "yes" if t["at_least_95_percent_of_full"] else "no"])
    lines += _table(["pool", "rule", "relative %", "random %", "rule − random (paired)", "beats random > 1 std",
                     ">= 95% of full"], trows)
    lines.append("")

    lines += [f"## What the rules select (pool {first}, {cf:.0%}, mean over seeds)", "",
              f"![composition]({results['figure_names']['composition']})", "",
              "Question-type shares show task coverage (failure mode 2: a task starved by the vote). Answer balance",
              "(failure mode 1: a specialist drifting to one answer class): the normalised entropy of each answer",
              "type's answers (1 = all answers equally often), the yes share of yes/no answers, and the yes/no skew",
              "|2 x yes share - 1| (0 = balanced, 1 = one answer only). Entropy and skew are computed per seed, then",
              "averaged, so drifts in opposite directions in different seeds do not cancel; the yes share and the",
              "figure's answer heatmap are plain means over seeds.", ""]
    comp = results["composition"][first]
    ckeys = [run_key("full", 1.0)] + [k for k in keys_at(results, first, cf)]
    crow = []
    for key in ckeys:
        c = comp[key]
        q, b, k = c["question_type"], c["balance"], c["kind"]
        crow.append([f"`{results['summary'][first][key]['rule']}`",
                     *[f"{q.get(t, 0) * 100:.0f}%" for t in TASKS],
                     f"{b['shape_entropy']:.2f}", f"{b['color_entropy']:.2f}", f"{b['yes_share'] * 100:.0f}%",
                     f"{b['yesno_skew']:.2f}",
                     *[f"{k.get(x, 0) * 100:.0f}%" for x in KINDS]])
    lines += _table(["rule", "shape q", "color q", "yes/no q", "shape-answer entropy", "colour-answer entropy",
                     "yes share", "yes/no skew", *KINDS], crow)
    lines.append("")

    feat = results["features"]
    lines += [
        "## Train-side features: Adam (LESS) vs SGD", "",
        "Measured exactly (identity projection) on a sample of pool rows at every warmup checkpoint, all seeds",
        "and pools. The LESS Adam feature is `(0.9 m + 0.1 g) / sqrt(v' + eps)`; its momentum term",
        "`0.9 m / sqrt(v' + eps)` is shared by every row up to the per-coordinate scale.", "",
    ]
    lines += _table(["measure", "value"], [
        ["share of the Adam feature's norm carried by the momentum term", _pm(feat["momentum_share"], 1, 3)],
        ["cosine between the Adam feature and its momentum term", _pm(feat["momentum_cosine"], 1, 3)],
        ["mean cosine between two rows' Adam features", _pm(feat["pairwise_cosine_adam"], 1, 3)],
        ["mean cosine between two rows' SGD gradients", _pm(feat["pairwise_cosine_sgd"], 1, 3)],
        ["the same two after projection (stores), Adam", _pm(feat["pairwise_cosine_projected_adam"], 1, 3)],
        ["the same two after projection (stores), SGD", _pm(feat["pairwise_cosine_projected_sgd"], 1, 3)],
    ])
    lines += ["", feature_verdict(results), ""]

    stage1 = results["stage1"]
    lines += ["## Base model (no stage 2)", ""]
    lines += _table(["seed", *[f"{t} acc %" for t in TASKS]],
                    [[s, *[f"{v['accuracy'][t] * 100:.1f}" for t in TASKS]] for s, v in stage1.items()])
    tm = results["fresh_run_timing"] or results["timing"]
    lines += [
        "", "## Cost", "",
        f"The run that computed every job ({tm.get('finished', 'this invocation')}): "
        f"wall time {tm['wall_s'] / 60:.1f} min, CPU time {tm['cpu_s'] / 60:.1f} min over all processes "
        f"({tm['mode']}, {tm['cpu_count']} cores, device {tm['device']}). Load average before/after: "
        f"{', '.join(f'{x:.1f}' for x in tm['load_average_before'])} / "
        f"{', '.join(f'{x:.1f}' for x in tm['load_average_after'])} (a load above the core count means other "
        f"work shared the machine and the wall time is inflated). Jobs computed: {tm['jobs_run']}"
        + ("" if results["fresh_run_timing"] else
           f", taken from earlier invocations: {tm['jobs_cached']} (no invocation computed every job, so these "
           "times do not cover the whole experiment)") + ".",
        "",
    ]
    return "\n".join(lines)


def summary_lines(results) -> list[str]:
    """The page's opening paragraph: the library's default and the paper's rule against random, per pool."""
    args = results["arguments"]
    cf = args["compare_fraction"]
    out = ["## Summary", ""]
    for pool, per_rule in results["targets"].items():
        tasks = ", ".join(results["pools"][pool]["tasks"])
        for rule, label in ((args["default_rule"], "library default"), (args["paper_rule"], "paper's rule")):
            t = per_rule.get(rule)
            if t is None:
                continue
            out.append(f"- Pool {pool} ({tasks}), {cf:.0%}: `{rule}` ({label}) {_verdict(t)}")
            if "holdout" in t and rule == args["default_rule"]:
                seeds = ", ".join(str(x) for x in t["holdout_seeds"])
                out.append(f"  - seeds {seeds} alone (not used to choose the default): {_verdict(t['holdout'])}")
    feat = results["features"]
    out.append(f"- Train features: the momentum term carries {_pm(feat['momentum_share'], 100, 0)}% of the Adam "
               f"(LESS) feature's norm; two rows' Adam features have mean cosine "
               f"{_pm(feat['pairwise_cosine_adam'], 1, 2)} against {_pm(feat['pairwise_cosine_sgd'], 1, 2)} for plain "
               "gradients.")
    holdout = ", ".join(str(x) for x in args.get("holdout_seeds", []))
    out += ["", f"How the default was chosen: plain-gradient features and the balanced specialist were picked in "
            "earlier runs of pool A; the floor share was then compared at 0 (the paper's vote), 0.5 and 1 on seeds "
            "0-2 of both pools, where 1 was best on both, and confirmed on seeds "
            f"{holdout or '(none)'} before it became the default. Both pools' tasks and mixes were fixed before any "
            "selection was measured; the row kinds are hidden from every rule and only counted in this report."]
    return out


def _verdict(t: dict) -> str:
    verdict = ("beats random by more than one std" if t["beats_random_by_more_than_one_std"]
               else "does not beat random by more than one std")
    keep = "keeps at least 95% of full" if t["at_least_95_percent_of_full"] else "keeps less than 95% of full"
    return (f"{_pm(t['relative'])}% of full vs random {_pm(t['random'])}%; paired difference "
            f"{_pm(t['difference'])} points; it {verdict} and {keep}.")


def keys_at(results, pool, fraction):
    s = results["summary"][pool]
    return sorted((k for k, e in s.items() if e["fraction"] == fraction), key=lambda k: -s[k]["relative"][0])


def _rule_legend() -> str:
    return ("Rules: `icons` = the paper's rule: votes (80th-percentile threshold per task, rows ranked by votes) on "
            "the mean-cosine specialist (`compute_influence(specialist=\"mean\")`) with Adam (LESS) features; "
            "`-sgd` = plain-gradient train features; `-balanced` = per-validation-example balanced specialist, each "
            "validation example gets an equal quota of top rows (`specialist=\"balanced\"`); `-zscore` = each "
            "validation example's cosines standardised over the pool, then averaged (`specialist=\"zscore\"`); "
            "`-floor` = the whole subset reserved as equal per-task floors of each task's own top rows, tasks taking "
            "turns (`select(task_floor=1.0)`), `-floor50` = half of it, votes fill the rest (`task_floor=0.5`); "
            "`icons-sgd-balanced-floor` is the library's default; `mean` = mean of task scores; `less-<task>` = one "
            "task's score alone (LESS, Adam features).")


def feature_verdict(results) -> str:
    s = results["summary"][results["arguments"]["pools"][0]]
    cf = results["arguments"]["compare_fraction"]
    pairs = []
    for rule in ("icons", "icons-floor", "icons-balanced-floor", "icons-balanced"):
        sgd = rule.replace("icons", "icons-sgd", 1)
        a, b = s.get(run_key(rule, cf)), s.get(run_key(sgd, cf))
        if a and b:
            pairs.append(f"`{rule}` {_pm(a['relative'])} vs `{sgd}` {_pm(b['relative'])}")
    return "Selection quality with each feature: " + ("; ".join(pairs) if pairs else "not measured") + "."


def figures(results, report_dir: str, name: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = results["arguments"]
    first = args["pools"][0]
    summary = results["summary"][first]
    names = {"main": f"{name}.png", "composition": f"{name}_composition.png"}

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    def label(rule):
        extra = {args["default_rule"]: " (library default)", args["paper_rule"]: " (paper)"}.get(rule, "")
        return rule + extra

    for rule, style in zip(args["sweep_rules"], ("o-", "s--", "^-.", "d:"), strict=False):  # at most 4 drawn
        xs = [f for f in args["fractions"] if run_key(rule, f) in summary]
        ys = np.array([summary[run_key(rule, f)]["relative"] for f in xs]) * 100
        ax.errorbar(np.array(xs) * 100, ys[:, 0], yerr=ys[:, 1], fmt=style, capsize=3, label=label(rule))
    cf = args["compare_fraction"]
    best = [k for k in keys_at(results, first, cf) if summary[k]["rule"] not in args["sweep_rules"]][:2]
    for shift, key in zip((-1.2, 1.2), best, strict=False):  # best has at most 2
        e = summary[key]
        ax.errorbar([cf * 100 + shift], [e["relative"][0] * 100], yerr=[e["relative"][1] * 100], fmt="*",
                    markersize=10, capsize=3, label=f"{e['rule']} ({cf:.0%})")
    ax.axhline(100, color="gray", lw=1, ls="--")
    ax.axhline(95, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("share of the pool selected (%)")
    ax.set_ylabel("relative performance (% of full pool)")
    ax.set_title(f"easy-VQA replica, pool {first} ({len(args['seeds'])} seeds, mean ± std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report_dir, names["main"]))
    plt.close(fig)

    comp = results["composition"][first]
    keys = [run_key("full", 1.0)] + keys_at(results, first, cf)
    labels = ["pool" if k.startswith("full@") else summary[k]["rule"] for k in keys]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(keys) + 1.8), dpi=110, sharey=True)
    y = np.arange(len(keys))
    for ax, field, cats, title in (
        (axes[0], "question_type", TASKS, "question type"),
        (axes[2], "kind", KINDS, "hidden row kind (report only)"),
    ):
        left = np.zeros(len(keys))
        for cat in cats:
            vals = np.array([comp[k][field].get(cat, 0) for k in keys])
            ax.barh(y, vals, left=left, label=cat)
            left += vals
        ax.set_title(title)
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=len(cats))
    grid = np.zeros((len(keys), len(ALL_ANSWERS)))
    for i, k in enumerate(keys):
        for answers in ANSWERS.values():
            total = sum(comp[k]["answer"].get(a, 0) for a in answers)
            for a in answers:
                grid[i, ALL_ANSWERS.index(a)] = comp[k]["answer"].get(a, 0) / total * len(answers) if total else 0
    im = axes[1].imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
    axes[1].set_xticks(range(len(ALL_ANSWERS)))
    axes[1].set_xticklabels(ALL_ANSWERS, rotation=60, fontsize=7)
    axes[1].set_title("answer share within its type (1 = even)")
    fig.colorbar(im, ax=axes[1], fraction=0.04)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"What each rule selects: pool {first}, {cf:.0%}, mean over seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(report_dir, names["composition"]))
    plt.close(fig)
    return names


def write(results, report_dir: str, name: str) -> list[str]:
    os.makedirs(report_dir, exist_ok=True)
    results["figure_names"] = figures(results, report_dir, name)
    paths = [os.path.join(report_dir, f"{name}.json"), os.path.join(report_dir, f"{name}.md")]
    with open(paths[0], "w") as handle:
        json.dump(results, handle, indent=1, default=float)
    with open(paths[1], "w") as handle:
        handle.write(markdown(results))
    return paths + [os.path.join(report_dir, n) for n in results["figure_names"].values()]


def summary_text(results) -> str:
    lines = []
    cf = results["arguments"]["compare_fraction"]
    for pool in results["arguments"]["pools"]:
        s = results["summary"][pool]
        lines.append(f"pool {pool}: relative performance at {cf:.0%} (mean ± std over seeds)")
        for key in keys_at(results, pool, cf):
            lines.append(f"  {s[key]['rule']:<24} {_pm(s[key]['relative'])}")
    t = results["timing"]
    lines.append(f"wall {t['wall_s'] / 60:.1f} min, CPU {t['cpu_s'] / 60:.1f} min ({t['mode']})")
    return "\n".join(lines)


def candidate_summary(args, results, invocations, names: dict) -> dict:
    """The per-seed numbers of decision_rule.md's candidates (``names``: candidate -> this replica's rule) for
    :func:`candidates.summarise`; relative performance in % of full."""
    pools = {}
    for pool in args.pools:
        per = {}
        for name, rule in names.items():
            key = run_key(rule, 1.0 if rule == "full" else args.compare_fraction)
            entry = results["summary"][pool].get(key)
            if entry is None:
                continue
            rel = {int(s): 100 * v for s, v in entry["relative_per_seed"].items()}
            comps = {}
            for s in rel:
                c = _read(os.path.join(pool_dir(args.output_dir, s, pool), "selections.json"))[key]["composition"]
                comps[s] = {"rows": c["rows"], "harmful": c["rows"] - c["kind"].get("clean", 0), "generalist": None,
                            "rows_per_task": {t: c["question_type"].get(t, 0) for t in TASKS}}
            per[name] = {"relative_per_seed": rel, "composition_per_seed": comps}
        pools[pool] = per
    mixes = {p: f"targets {', '.join(POOLS[p].tasks)}; kinds "
             + ", ".join(f"{k} {v:.0%}" for k, v in POOLS[p].mix.items())
             + ("; the same questions as pool A, none corrupted" if p == "A-clean" else "") for p in args.pools}
    return summarise_candidates("easyvqa", pools, choice_seeds=[s for s in args.seeds if s not in args.holdout_seeds]
                                or [0, 1, 2], heldout_seeds=args.holdout_seeds, names=names, pool_mixes=mixes,
                                invocations=list(invocations), fraction=args.compare_fraction)
