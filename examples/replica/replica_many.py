#!/usr/bin/env python
"""The many-task replica: does an ICONS subset beat a random one when there are many target tasks?

A second, CPU-sized replica family in the ICONS paper's regime, built differently from the easy-VQA one: a tiny
causal LM (a Llama config in code, character vocabulary) and eight synthetic target tasks of different kinds and
answer spaces (arithmetic, comparison, counting, reversal, an invented fact table, maximum, classification and a
yes/no task made of three subtasks, scored as MME is), pools with unequal task shares, generalist rows that
answer two or three tasks' questions at once, near-duplicates and 35-40% harmful rows (wrong answers, unreadable
inputs, off-task rows). Row kinds are hidden from every rule.

    python examples/replica/replica_many.py                 # the default run (6 seeds, pools M1 and M2)
    python examples/replica/replica_many.py --seeds 0 1 2   # a part of it; rerun to add the rest
    python examples/replica/replica_many.py --candidates --pools M1 M2 M-clean --report_name replica_many_candidates
                                                            # decision_rule.md's candidates at 20% on three pools

Per seed: a base model trained on clean one-question rows of every task but the fact table; per pool, a LoRA
warmup with ``transformers.Trainer`` + ``icons_hf.IconsCallback`` on 5% of the pool writes the gradient
features, ``icons_hf.compute_influence`` scores them and every rule selects; per (rule, fraction) the base model
with a fresh LoRA adapter (same seed) is trained for the same number of steps on the selected rows and scored on
answer-balanced test questions of every task (argmax over the task's answer space).

Results go to ``--output_dir`` (resumable: finished jobs are not redone) and the report to
``<report_dir>/replica_many.{md,json,png}``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

from candidates import CANDIDATES
from many_rules import RULE_NAMES
from replica_common import append_invocation, check_output_dir, invocation_timing, quiet_logging, run_job_graph

logger = logging.getLogger("replica_many")
CANDIDATE_FRACTION = 0.2

# Arguments that change what a finished job computed; a rerun into the same output_dir must keep them.
RESULT_FIELDS = ("pool_size", "validation_per_task", "test_per_leaf", "hidden", "base_rows", "base_steps",
                 "base_learning_rate", "warmup_fraction", "warmup_epochs", "warmup_batch_size", "checkpoints", "dim",
                 "train_steps", "batch_size", "learning_rate", "lora_r")


@dataclass
class ManyTaskArguments:
    output_dir: str = field(default="replica_many_runs", metadata={"help": "Work folder (resumable)."})
    report_dir: str = field(default="benchmarks/results", metadata={"help": "Where the report goes."})
    report_name: str = field(default="replica_many", metadata={"help": "Report file name (no extension)."})
    easy_vqa_results: str = field(default="benchmarks/results/replica.json", metadata={
        "help": "The easy-VQA replica's results (pools A and B), read to choose the default across both regimes."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5], metadata={"help": "Seeds."})
    choice_seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "Seeds the default was chosen on; the others are reported apart as held out."})
    pools: list[str] = field(default_factory=lambda: ["M1", "M2"], metadata={"help": "Pools (tasks.POOLS)."})
    rules: list[str] = field(default_factory=lambda: list(RULE_NAMES), metadata={"help": "Selection rules."})
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4], metadata={
        "help": "Fractions of the first pool."})
    other_pool_fractions: list[float] = field(default_factory=lambda: [0.2], metadata={
        "help": "Fractions of the other pools (the fraction the default is chosen at)."})
    workers: int = field(default=0, metadata={"help": "Worker processes (0: one per CPU core)."})
    pool_size: int = field(default=3000, metadata={"help": "Pool rows."})
    validation_per_task: int = field(default=16, metadata={"help": "Validation rows per task (split over subtasks)."})
    test_per_leaf: int = field(default=100, metadata={"help": "Test questions per task or subtask."})
    hidden: int = field(default=64, metadata={"help": "Model width."})
    base_rows: int = field(default=2000, metadata={"help": "Rows of the base model's corpus."})
    base_steps: int = field(default=150, metadata={"help": "Base model training steps (batch 64)."})
    base_learning_rate: float = field(default=3e-3, metadata={"help": "Base model learning rate."})
    warmup_fraction: float = field(default=0.05, metadata={"help": "Share of the pool the warmup trains on."})
    warmup_epochs: int = field(default=4, metadata={"help": "Warmup epochs."})
    warmup_batch_size: int = field(default=16, metadata={"help": "Warmup batch size."})
    checkpoints: int = field(default=2, metadata={"help": "Warmup checkpoints with features."})
    dim: int = field(default=2048, metadata={"help": "Projected feature dimension."})
    train_steps: int = field(default=200, metadata={"help": "Stage-two steps, the same for every rule."})
    batch_size: int = field(default=32, metadata={"help": "Stage-two batch size."})
    learning_rate: float = field(default=5e-3, metadata={"help": "Warmup and stage-two learning rate."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over when the arguments changed."})
    candidates: bool = field(default=False, metadata={
        "help": "Run the candidates of benchmarks/results/decision_rule.md only (--rules and every pool's fractions "
                "become the candidates at 20%) and also write <report_dir>/candidates_many.{json,md}."})

    def __post_init__(self):
        if self.candidates:
            self.rules = [c for c in CANDIDATES if c != "full"]
            self.fractions = [CANDIDATE_FRACTION]
            self.other_pool_fractions = [CANDIDATE_FRACTION]


def make_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(ManyTaskArguments)


def plan_runs(args: ManyTaskArguments) -> dict[str, list[tuple[str, float]]]:
    """Per pool, its (rule, fraction) runs: every fraction on the first pool, ``other_pool_fractions`` on the
    others; ``full`` at 1.0 everywhere."""
    unknown = [r for r in args.rules if r not in RULE_NAMES]
    if unknown:
        raise ValueError(f"--rules: unknown rule {unknown[0]!r}; known: {', '.join(RULE_NAMES)}.")
    return {pool: [("full", 1.0)] + [(r, f) for r in args.rules
                                     for f in (args.fractions if i == 0 else args.other_pool_fractions)]
            for i, pool in enumerate(args.pools)}


def run_jobs(args: ManyTaskArguments, plan, workers: int) -> dict:
    """Base models first; a (seed, pool)'s selections when its base exists; its trainings when they exist.
    The largest jobs of a seed go first so the two workers finish together."""
    import many_harness as harness

    def after(job: dict) -> list[dict]:
        if job["kind"] == "base":
            return [{"kind": "prep", "seed": job["seed"], "pool": p, "runs": plan[p]} for p in args.pools]
        if job["kind"] == "prep":
            return [{"kind": "train", "seed": job["seed"], "pool": job["pool"], "rule": r, "fraction": f}
                    for r, f in sorted(plan[job["pool"]], key=lambda run: -run[1])]
        return []

    first = [{"kind": "base", "seed": s} for s in args.seeds]
    return run_job_graph(harness.Worker, asdict(args), first, after, workers, logger, hidden=("runs",))


def main(argv=None) -> dict:
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    quiet_logging()
    started, load_before = time.perf_counter(), os.getloadavg()
    check_output_dir(args.output_dir, {k: getattr(args, k) for k in RESULT_FIELDS}, args.overwrite_output_dir)
    plan = plan_runs(args)
    workers = args.workers or (os.cpu_count() or 1)
    timing = invocation_timing(started, load_before, workers, run_jobs(args, plan, workers), args.seeds)
    invocations = append_invocation(args.output_dir, timing)
    import many_report as report

    results = report.collect(args, plan, invocations)
    paths = report.write(results, args.report_dir, args.report_name)
    if args.candidates:
        import candidates

        summary = report.candidate_summary(args, results, invocations, CANDIDATE_FRACTION)
        command = (f"python examples/replica/replica_many.py --candidates --pools {' '.join(args.pools)} "
                   f"--workers 1 --report_name {args.report_name}")
        paths += candidates.write(summary, args.report_dir, "Many-task replica", command)
    logger.info("report: %s", ", ".join(paths))
    return results


if __name__ == "__main__":
    main()
