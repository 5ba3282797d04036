"""The candidates of ``benchmarks/results/decision_rule.md`` on one replica family: per pool and candidate, the
relative performance at 20% per seed, the paired difference against random on the choice seeds, the held-out seeds
and all seeds, what each candidate keeps (generalist/conversation rows, harmful rows, rows per task), and the
decision rule's per-pool tests. Written as ``candidates_<family>.json`` (machine-readable, for applying the decision
rule across families) and ``candidates_<family>.md``.

The families call :func:`write` with their per-seed numbers; nothing here knows how a family trains or selects.
"""

from __future__ import annotations

import json
import os

import numpy as np

# The candidates' names, as every family's results use them (decision_rule.md), in the order the tables show them.
CANDIDATES = ("default", "floor50", "floor0", "paper", "gain", "veto", "rank", "mix", "blend", "random", "full")
CANDIDATE_HELP = {
    "default": "balanced specialist, `select(method=\"vote\")`, `task_floor=1` (equal per-task floors)",
    "floor50": "balanced, vote, `task_floor=0.5`",
    "floor0": "balanced, vote, `task_floor=0` (votes alone)",
    "paper": "the paper's rule",
    "gain": "balanced, `select(method=\"gain\")`",
    "veto": "balanced, `select(method=\"veto\")`",
    "rank": "balanced, `select(method=\"rank\")`",
    "mix": "balanced, `select(method=\"mix\")`: per-task floors sized by the pool's task mix",
    "blend": "balanced, `select(method=\"random\", task_floor=0.5, seed=<the run's seed>)`",
    "random": "a seeded uniform sample",
    "full": "the whole pool (the 100 of relative performance)",
}


def mean_std(values) -> list[float] | None:
    """``[mean, sample std]`` of the values (std 0 for one value); None for none."""
    values = np.asarray(list(values), dtype=np.float64)
    if not len(values):
        return None
    return [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]


def _paired(a: dict, b: dict, seeds) -> list[float] | None:
    common = [s for s in seeds if s in a and s in b]
    return mean_std(a[s] - b[s] for s in common)


def seed_group(per_candidate: dict, seeds) -> dict:
    """One pool, one group of seeds: per candidate its relative performance and paired difference against random
    (both mean +- std over the seeds), and the decision rule's tests: ``beats_random`` (mean(d) > std(d)),
    ``loses_to_random`` (mean(d) < -std(d)), ``loses_to`` (candidates s with mean(r - s) < -std(r - s)) and
    ``passes`` (beats random and loses to no candidate)."""
    rnd = per_candidate.get("random", {})
    out = {}
    for name, per_seed in per_candidate.items():
        mine = {s: v for s, v in per_seed.items() if s in seeds}
        if not mine:
            continue
        entry = {"seeds": sorted(mine), "relative": mean_std(mine.values())}
        if name not in ("random", "full"):
            d = _paired(mine, rnd, seeds)
            entry["difference_vs_random"] = d
            if d is not None:
                entry["beats_random"] = bool(d[0] > d[1])
                entry["loses_to_random"] = bool(d[0] < -d[1])
            losses = []
            for other, other_seeds in per_candidate.items():
                if other in (name, "full"):
                    continue
                pd = _paired(mine, other_seeds, seeds)
                if pd is not None and pd[0] < -pd[1]:
                    losses.append(other)
            entry["loses_to"] = losses
            entry["passes"] = bool(entry.get("beats_random")) and not losses
        out[name] = entry
    return out


def kept(compositions: dict) -> dict:
    """Mean over seeds of what a candidate keeps: rows, generalist/conversation rows (count and share of the
    subset; None where the pool has none), harmful rows (share of the subset), rows per task."""
    items = list(compositions.values())
    if not items:
        return {}
    tasks = sorted({t for c in items for t in c["rows_per_task"]})
    out = {"rows": float(np.mean([c["rows"] for c in items])),
           "harmful_share": float(np.mean([c["harmful"] / max(1, c["rows"]) for c in items])),
           "rows_per_task": {t: float(np.mean([c["rows_per_task"].get(t, 0) for c in items])) for t in tasks}}
    if any(c.get("generalist") is not None for c in items):
        out["generalist_rows"] = float(np.mean([c["generalist"] for c in items]))
        out["generalist_share"] = float(np.mean([c["generalist"] / max(1, c["rows"]) for c in items]))
    else:
        out["generalist_rows"] = out["generalist_share"] = None
    return out


def summarise(family: str, pools: dict, *, choice_seeds, heldout_seeds, names: dict, pool_mixes: dict,
              invocations: list, fraction: float = 0.2) -> dict:
    """``pools[pool][candidate]`` = ``{"relative_per_seed": {seed: % of full}, "composition_per_seed": {seed:
    {"rows", "harmful", "generalist" (None if the family has none), "rows_per_task"}}}``; ``names``: candidate ->
    the family's own rule name."""
    seeds_run = sorted({s for per in pools.values() for c in per.values() for s in c["relative_per_seed"]})
    groups = {"choice": [s for s in choice_seeds if s in seeds_run],
              "held_out": [s for s in heldout_seeds if s in seeds_run], "all": seeds_run}
    out = {"family": family, "fraction": fraction, "seeds": seeds_run, "choice_seeds": list(choice_seeds),
           "heldout_seeds": list(heldout_seeds), "candidate_names": names, "candidate_help": CANDIDATE_HELP,
           "pool_mixes": pool_mixes, "pools": {}, "invocations": invocations,
           "cost": {"wall_min": sum(i["wall_s"] for i in invocations) / 60,
                    "cpu_min": sum(i["cpu_s"] for i in invocations) / 60}}
    for pool, per in pools.items():
        rel = {c: {int(s): float(v) for s, v in per[c]["relative_per_seed"].items()} for c in CANDIDATES if c in per}
        out["pools"][pool] = {
            "relative_per_seed": {c: {str(s): v for s, v in sorted(r.items())} for c, r in rel.items()},
            "groups": {g: seed_group(rel, seeds) for g, seeds in groups.items() if seeds},
            "kept": {c: kept(per[c]["composition_per_seed"]) for c in CANDIDATES if c in per},
        }
    return out


def _fmt(pair, signed: bool = False) -> str:
    if pair is None:
        return "–"
    return f"{pair[0]:+.1f} ± {pair[1]:.1f}" if signed else f"{pair[0]:.1f} ± {pair[1]:.1f}"


def _pool_lines(pool: str, entry: dict, names: dict) -> list[str]:
    groups = dict(entry["groups"])
    if "held_out" not in groups:  # all seeds are the choice seeds
        groups.pop("all", None)
    head = ["candidate", "family's rule"]
    for g in groups:
        head += [f"relative % ({g} seeds)", f"− random ({g})"]
    head += ["generalist rows kept", "harmful share", "rows per task"]
    lines = [f"### Pool {pool}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in CANDIDATES:
        if name not in entry["kept"] and name not in entry["relative_per_seed"]:
            continue
        cells = [f"`{name}`", f"`{names.get(name, name)}`"]
        for g in groups.values():
            e = g.get(name, {})
            mark = " (passes)" if e.get("passes") else " (loses to random)" if e.get("loses_to_random") else ""
            cells += [_fmt(e.get("relative")), _fmt(e.get("difference_vs_random"), True) + mark]
        k = entry["kept"].get(name, {})
        gen = "–" if k.get("generalist_rows") is None else f"{k['generalist_rows']:.0f} ({k['generalist_share']:.0%})"
        cells += [gen, f"{k.get('harmful_share', 0):.0%}",
                  ", ".join(f"{t} {v:.0f}" for t, v in k.get("rows_per_task", {}).items())]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(summary: dict, title: str, command: str) -> str:
    lines = [f"# {title}: the candidates of decision_rule.md at {summary['fraction']:.0%}", "",
             f"Regenerate (resumable): `{command}`", "",
             f"Seeds run: {summary['seeds']}; choice seeds {summary['choice_seeds']}, held-out seeds "
             f"{summary['heldout_seeds']}. Relative performance: % of the full pool (mean over the pool's tasks of "
             "accuracy / full-pool accuracy, same seed), mean ± sample std over seeds; `− random`: the paired "
             "difference rule − random per seed, mean ± std. *passes*: beats random by more than one std of the "
             "paired difference and loses to no other candidate by more than one std (decision_rule.md, step 1, "
             "within this family). Generalist rows: rows asking questions of two or more target tasks (count and "
             "share of the subset); harmful share: wrong-answer, unreadable and off-task rows in the subset. Rows "
             "per task: rows holding a question of the task (a multi-task row counts for each). Kept shares are "
             "means over all seeds run.", "", "## Candidates", "", "| candidate | family's rule | what it is |",
             "|---|---|---|"]
    lines += [f"| `{c}` | `{summary['candidate_names'].get(c, c)}` | {CANDIDATE_HELP[c]} |" for c in CANDIDATES]
    lines += ["", "## Pools", ""]
    lines += [f"- `{p}`: {m}" for p, m in summary["pool_mixes"].items()]
    lines += ["", "## Results", ""]
    for pool, entry in summary["pools"].items():
        lines += _pool_lines(pool, entry, summary["candidate_names"])
    lines += ["## Cost", ""]
    for inv in summary["invocations"]:
        lines.append(f"- {inv.get('finished', '?')}: wall {inv['wall_s'] / 60:.1f} min, CPU {inv['cpu_s'] / 60:.1f} "
                     f"min, jobs run {inv.get('jobs_run')}, cached {inv.get('jobs_cached')}, load average before/after "
                     f"{', '.join(f'{x:.1f}' for x in inv['load_average_before'])} / "
                     f"{', '.join(f'{x:.1f}' for x in inv['load_average_after'])}")
    lines.append(f"- total: wall {summary['cost']['wall_min']:.1f} min, CPU {summary['cost']['cpu_min']:.1f} min")
    return "\n".join(lines) + "\n"


def write(summary: dict, report_dir: str, title: str, command: str) -> list[str]:
    os.makedirs(report_dir, exist_ok=True)
    base = os.path.join(report_dir, f"candidates_{summary['family']}")
    with open(base + ".json", "w") as handle:
        json.dump(summary, handle, indent=1)
    with open(base + ".md", "w") as handle:
        handle.write(markdown(summary, title, command))
    return [base + ".json", base + ".md"]
