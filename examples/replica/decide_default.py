#!/usr/bin/env python
"""Applies the committed decision rule (``benchmarks/results/decision_rule.md``) to every replica family's
candidates: per pool, each candidate's paired difference against random at 20% (mean +- std over seeds), whether
it passes (beats random by more than one std and loses to no candidate by more than one std), and the default the
rule chooses. Reads ``candidates_*.json`` beside the decision rule; writes ``decision.md`` and ``decision.json``.

    python examples/replica/decide_default.py                 # choice seeds, held-out seeds and all seeds

Each ``candidates_<family>.json`` holds ``{"pools": {pool: {candidate: {seed: relative performance}}},
"choice_seeds": [...]}`` (a pool may nest the per-seed table under ``relative_per_seed``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

CANDIDATES = ("default", "floor50", "floor0", "paper", "gain", "veto", "rank", "mix", "blend")


def _ms(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def paired(pool: dict, a: str, b: str, seeds: list[str]) -> tuple[float, float]:
    return _ms([pool[a][s] - pool[b][s] for s in seeds])


def judge(pools: dict, seeds_of: dict) -> dict:
    """Per candidate and pool: paired difference vs random, the worst loss to another candidate, and pass/fail."""
    out = {}
    for cand in CANDIDATES:
        out[cand] = {}
        for name, pool in pools.items():
            seeds = seeds_of[name]
            if cand not in pool or "random" not in pool or len(seeds) < 2:
                continue
            vs_random = paired(pool, cand, "random", seeds)
            losses = {other: paired(pool, cand, other, seeds) for other in CANDIDATES if other != cand and other
                      in pool}
            worst = min(losses.items(), key=lambda kv: kv[1][0] + kv[1][1]) if losses else (None, (0.0, 0.0))
            beats = vs_random[0] > vs_random[1]
            loses_to = [o for o, (m, s) in losses.items() if m < -s]
            out[cand][name] = {"vs_random": vs_random, "beats_random": bool(beats), "loses_to": loses_to,
                               "worst_other": [worst[0], *worst[1]], "passes": bool(beats and not loses_to),
                               "loses_to_random": bool(vs_random[0] < -vs_random[1])}
    return out


def choose(verdict: dict, pools: list[str]) -> dict:
    complete = [c for c in CANDIDATES if all(p in verdict[c] for p in pools)]
    passing = [c for c in complete if all(verdict[c][p]["passes"] for p in pools)]

    def worst(c):
        return min(verdict[c][p]["vs_random"][0] for p in pools)

    if passing:
        return {"default": max(passing, key=worst), "step": 2, "passing": passing}
    safe = [c for c in complete if not any(verdict[c][p]["loses_to_random"] for p in pools)]
    pick = max(safe or complete, key=worst)
    return {"default": pick, "step": 3, "passing": [], "never_below_random": safe,
            "worst_case": {c: worst(c) for c in complete}}


def final_choice(groups: dict) -> dict:
    """Step 4: the choice seeds' pick stands unless, over all seeds, it loses to random by more than one std on
    some pool; then step 3 over all seeds decides."""
    picked = groups["choice"]["choice"]["default"]
    verdict = groups["all"]["verdict"][picked]
    lost = [p for p in groups["all"]["pools"] if verdict.get(p, {}).get("loses_to_random")]
    if not lost:
        return {"default": picked, "overturned": False, "choice_seeds_pick": picked}
    return {"default": groups["all"]["choice"]["default"], "overturned": True, "choice_seeds_pick": picked,
            "loses_to_random_on": lost}


def load(report_dir: str) -> tuple[dict, dict, dict]:
    """Per pool: each candidate's relative performance per seed, the choice seeds, and what each candidate keeps
    (``kept``, where the family reports it)."""
    pools, choice, kept = {}, {}, {}
    for path in sorted(glob.glob(os.path.join(report_dir, "candidates_*.json"))):
        with open(path) as handle:
            data = json.load(handle)
        for name, pool in data["pools"].items():
            kept[name] = pool.get("kept", {})
            pool = pool.get("relative_per_seed", pool)
            pools[name] = {c: {str(s): v for s, v in seeds.items()} for c, seeds in pool.items()
                           if c not in ("full", "kept")}
            choice[name] = [str(s) for s in data["choice_seeds"]]
    return pools, choice, kept


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    pools, choice, kept = load(args.report_dir)
    groups = {}
    for group in ("choice", "held_out", "all"):
        seeds_of = {}
        for name, pool in pools.items():
            common = sorted(set.intersection(*(set(v) for v in pool.values())), key=int)
            seeds_of[name] = [s for s in common if group == "all" or (s in choice[name]) == (group == "choice")]
        usable = [p for p in pools if len(seeds_of[p]) >= 2]
        verdict = judge({p: pools[p] for p in usable}, seeds_of)
        groups[group] = {"seeds": seeds_of, "pools": usable, "verdict": verdict,
                         "choice": choose(verdict, usable) if usable else None}
    groups["final"] = final_choice(groups)
    with open(os.path.join(args.report_dir, "decision.json"), "w") as handle:
        json.dump({**groups, "kept": kept}, handle, indent=1)
    with open(os.path.join(args.report_dir, "decision.md"), "w") as handle:
        handle.write(markdown(groups) + "\n" + kept_markdown(kept))
    return groups


def kept_markdown(kept: dict) -> str:
    """Per pool and candidate (means over the seeds run): the share of the subset that is conversation
    (generalist) rows and harmful rows, and its rows per task."""
    lines = ["## What each candidate keeps", "", "Per pool, the mean over all seeds of the subset's share of "
             "conversation (generalist: two or more target tasks) rows and of harmful rows, and its rows per task "
             "(rows holding a question of the task; real model: clean answers of the task). `full` is the pool "
             "itself.", ""]
    for pool, per in kept.items():
        if not per:
            continue
        lines += [f"### {pool}", "", "| candidate | conversation share | harmful share | rows per task |",
                  "|---|---|---|---|"]
        for cand in (*CANDIDATES, "random", "full"):
            k = per.get(cand)
            if not k:
                continue
            conv = "–" if k.get("generalist_share") is None else f"{k['generalist_share']:.0%}"
            tasks = ", ".join(f"{t} {v:.0f}" for t, v in k.get("rows_per_task", {}).items())
            lines.append(f"| {cand} | {conv} | {k['harmful_share']:.0%} | {tasks} |")
        lines.append("")
    return "\n".join(lines)


def markdown(groups: dict) -> str:
    lines = ["# The decision rule applied", "", "Paired difference against random at 20% (mean +- std over seeds); "
             "`*` passes (beats random by more than one std and loses to no candidate by more than one std), "
             "`-` loses to random by more than one std.", ""]
    for group, data in groups.items():
        if group == "final":
            final = data
            lines += ["## Step 4", "", f"The choice seeds picked `{final['choice_seeds_pick']}`. " + (
                f"Over all seeds it loses to random by more than one std on {', '.join(final['loses_to_random_on'])}, "
                f"so step 3 over all seeds decides: **{final['default']}**." if final["overturned"] else
                "Over all seeds it loses to random by more than one std on no pool: the choice stands."), ""]
            continue
        if not data["pools"]:
            continue
        pools = data["pools"]
        lines += [f"## {group.replace('_', '-')} seeds", "", "| candidate | " + " | ".join(
            f"{p} ({len(data['seeds'][p])})" for p in pools) + " |", "|---|" + "---|" * len(pools)]
        for cand, per_pool in data["verdict"].items():
            cells = []
            for p in pools:
                v = per_pool.get(p)
                if v is None:
                    cells.append("n/a")
                    continue
                mark = "*" if v["passes"] else ("-" if v["loses_to_random"] else "")
                cells.append(f"{v['vs_random'][0]:+.1f} +- {v['vs_random'][1]:.1f}{mark}")
            lines.append(f"| {cand} | " + " | ".join(cells) + " |")
        choice = data["choice"]
        lines += ["", f"Chosen by step {choice['step']} of the rule: **{choice['default']}**"
                  + (f" (passing everywhere: {', '.join(choice['passing'])})" if choice["passing"] else
                     f"; no candidate passes every pool; never below random by one std: "
                     f"{', '.join(choice.get('never_below_random', [])) or 'none'}"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
