#!/usr/bin/env python
"""The quality replica: does an ICONS subset train a better model than a random one of the same size?

A small, CPU-sized copy of the ICONS paper's table (arXiv 2501.00654, relative performance at 5-60% of the pool)
on easy-VQA: three target tasks (shape, colour, yes/no), a training pool with harmful rows (wrong answers,
off-task rows, unreadable images) besides clean ones, and for every selection rule the same model trained from
the same start for the same number of steps, scored on held-out test questions.

    python examples/replica/replica.py                      # the default run (6 seeds, both pools)
    python examples/replica/replica.py --candidates --pools A B A-clean --report_name replica_candidates
                                                             # decision_rule.md's candidates at 20%, three pools
    accelerate launch examples/replica/replica.py            # the same, under accelerate (one process on a CPU)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        examples/replica/replica.py                          # two processes: warmups run data-parallel (the
                                                             # library's distributed feature extraction), the
                                                             # training runs are shared out between the ranks

Stages, per seed: (1) a base model whose vision side is trained first (shape/colour of every train-split image,
then captions and clean questions on images that are never in the pool), cached; (2) per pool, a LoRA warmup
with ``transformers.Trainer`` + ``IconsCallback`` on 5% of the pool writes Adam (LESS) and SGD gradient features,
which every rule scores and selects from; (3) per (rule, fraction), LoRA + projector trained for a fixed number
of steps on the selected rows, evaluated by exact match of the answer-vocabulary prediction (the argmax over
the 13 easy-VQA answers at the answer position) with the shipped ``exact_match`` metric.

Results go to ``--output_dir`` (resumable: finished jobs are not redone) and the report to
``<report_dir>/<report_name>.{md,json,png}`` and ``<report_name>_composition.png``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field

from replica_common import append_invocation, check_output_dir, cpu_seconds

logger = logging.getLogger("replica")

DEFAULT_RULE = "icons-sgd-balanced-floor"  # the library's defaults
PAPER_RULE = "icons"  # the paper's rule: Adam (LESS) features, mean-cosine specialist, votes without floors
COMPARE_RULES = ["mean", "less-shape", "less-color", "less-yesno", "icons-sgd", "icons-sgd-balanced",
                 "icons-sgd-balanced-floor50", "icons-sgd-floor", "icons-balanced-floor"]
OTHER_POOL_RULES = ["icons-sgd", "icons-sgd-balanced", "icons-sgd-balanced-floor50"]
# The candidates of benchmarks/results/decision_rule.md -> this replica's rule names. `paper` is this replica's
# paper rule as it always was: Adam (LESS) features, mean-cosine specialist, votes above the 80th percentile (the
# 100(1-f) percentile at 20%) with `>`; the library's preset="paper" uses plain gradients and `>=`.
CANDIDATE_RULES = {"default": DEFAULT_RULE, "floor50": "icons-sgd-balanced-floor50", "floor0": "icons-sgd-balanced",
                   "paper": PAPER_RULE, "gain": "gain-sgd-balanced", "veto": "veto-sgd-balanced",
                   "rank": "rank-sgd-balanced", "mix": "mix-sgd-balanced", "blend": "blend-sgd-balanced",
                   "random": "random", "full": "full"}

# Arguments that change what a finished job computed; a rerun into the same output_dir must keep them.
RESULT_FIELDS = (
    "pool_size", "validation_per_task", "test_per_task", "stage1_images", "vision_steps", "stage1_steps",
    "stage1_questions", "warmup_fraction", "warmup_epochs", "warmup_batch_size", "checkpoints", "dim",
    "diagnostic_rows", "train_steps", "batch_size", "learning_rate", "lora_r", "threshold_percentile",
)


@dataclass
class ReplicaArguments:
    output_dir: str = field(default="replica_runs", metadata={"help": "Work folder (stores, models, per-run results)."})
    report_dir: str = field(default="benchmarks/results", metadata={"help": "Where the report files are written."})
    report_name: str = field(default="replica", metadata={"help": "Base name of the report files."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5],
                             metadata={"help": "One full replica per seed."})
    holdout_seeds: list[int] = field(default_factory=lambda: [3, 4, 5], metadata={
        "help": "Seeds that played no part in choosing the library's default rule; the report shows them apart."})
    pools: list[str] = field(default_factory=lambda: ["A", "B"], metadata={
        "help": "Pools to run (replica_harness.POOLS). The first gets the fraction sweep and every compared rule; the "
                "others get full, random, the default and paper rules and --other_pool_rules at --compare_fraction."})
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4, 0.6],
                                   metadata={"help": "Fractions of the pool for --sweep_rules."})
    sweep_rules: list[str] = field(
        default_factory=lambda: [PAPER_RULE, "random", DEFAULT_RULE],
        metadata={"help": "Rules run at every fraction (see replica_harness.Rule for names)."})
    compare_fraction: float = field(default=0.2, metadata={"help": "Fraction for the rule comparison."})
    compare_rules: list[str] = field(default_factory=lambda: list(COMPARE_RULES),
                                     metadata={"help": "Further rules run at --compare_fraction on the first pool."})
    other_pool_rules: list[str] = field(
        default_factory=lambda: list(OTHER_POOL_RULES),
        metadata={"help": "Further rules run at --compare_fraction on the other pools."})
    default_rule: str = field(default=DEFAULT_RULE, metadata={
        "help": "The rule that the library's defaults give (IconsCallback's features, compute_influence's "
                "specialist, select()'s floor); the report checks the targets for it."})
    paper_rule: str = field(default=PAPER_RULE, metadata={
        "help": "The paper's rule, reported beside the default."})
    pool_size: int = field(default=3000, metadata={"help": "Rows per pool."})
    validation_per_task: int = field(default=24, metadata={"help": "Answer-balanced validation rows per task."})
    test_per_task: int = field(default=1000, metadata={"help": "Answer-balanced held-out test rows per task."})
    stage1_images: int = field(default=1000, metadata={"help": "Train-split images kept out of the pool for stage 1."})
    vision_steps: int = field(default=1000, metadata={"help": "Vision-tower steps (shape/colour probe, batch 64)."})
    stage1_steps: int = field(default=500, metadata={"help": "Captions + clean questions steps (batch 32)."})
    stage1_questions: int = field(default=1500, metadata={"help": "Clean questions on stage-1 images in stage 1."})
    warmup_fraction: float = field(default=0.05, metadata={"help": "Share of the pool the ICONS warmup trains on."})
    warmup_epochs: int = field(default=4, metadata={"help": "Warmup epochs."})
    warmup_batch_size: int = field(default=16, metadata={"help": "Warmup batch size."})
    checkpoints: int = field(default=2, metadata={"help": "Warmup checkpoints that get features."})
    dim: int = field(default=2048, metadata={"help": "Projected feature dimension."})
    diagnostic_rows: int = field(default=128, metadata={"help": "Pool rows for the exact Adam-term diagnostics."})
    train_steps: int = field(default=150, metadata={"help": "Steps of every selection's training run."})
    batch_size: int = field(default=32, metadata={"help": "Batch size of the training runs."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Learning rate of warmup and training runs."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (alpha = 2r) on the language model's attention."})
    threshold_percentile: float = field(default=80.0, metadata={"help": "ICONS vote threshold percentile."})
    workers: int = field(default=0, metadata={
        "help": "Worker processes for the jobs (0: one per CPU core; 1: run in this process). Ignored under a "
                "multi-process accelerate launch, where the ranks share the jobs."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Allow an output_dir whose finished jobs used other arguments (their results are deleted)."})
    candidates: bool = field(default=False, metadata={
        "help": "Run only full and the candidates of benchmarks/results/decision_rule.md (CANDIDATE_RULES) at "
                "--compare_fraction on every pool, no fraction sweep; also write "
                "<report_dir>/candidates_easyvqa.{json,md}."})

    def __post_init__(self):
        from replica_harness import POOLS, Rule

        for name in self.pools:
            if name not in POOLS:
                raise ValueError(f"--pools {name!r} is not a known pool; choose from {', '.join(POOLS)}.")
        if not self.pools:
            raise ValueError("--pools needs at least one pool.")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed.")
        for name in (*self.sweep_rules, *self.compare_rules, *self.other_pool_rules, self.default_rule,
                     self.paper_rule):
            Rule.parse(name)
        for value in (*self.fractions, self.compare_fraction, self.warmup_fraction):
            if not 0 < value <= 1:
                raise ValueError(f"fraction {value} must be in (0, 1].")
        for name in ("pool_size", "validation_per_task", "test_per_task", "train_steps", "batch_size", "checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1 (got {getattr(self, name)}).")
        if self.workers < 0:
            raise ValueError(f"--workers {self.workers} must be 0 (one per core) or a positive count.")
        if self.candidates:  # no sweep: the report's fraction table shows the compare fraction only
            self.fractions = [self.compare_fraction]


def make_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(ReplicaArguments)


# ------------------------------------------------------------------------------------------------- the plan


def plan_runs(args: ReplicaArguments) -> dict[str, list[tuple[str, float]]]:
    """Per pool, the (rule, fraction) runs; ``full`` at 1.0 everywhere."""
    plan = {}
    if args.candidates:
        runs = [("full", 1.0)] + [(r, args.compare_fraction) for r in CANDIDATE_RULES.values() if r != "full"]
        return {pool: list(runs) for pool in args.pools}
    for i, pool in enumerate(args.pools):
        runs = [("full", 1.0)]
        if i == 0:
            runs += [(rule, f) for rule in args.sweep_rules for f in args.fractions]
            runs += [(rule, args.compare_fraction)
                     for rule in [args.default_rule, args.paper_rule, "random", *args.compare_rules]]
        else:
            runs += [(rule, args.compare_fraction)
                     for rule in [args.default_rule, args.paper_rule, "random", *args.other_pool_rules]]
        seen, unique = set(), []
        for run in runs:
            if run not in seen:
                seen.add(run)
                unique.append(run)
        plan[pool] = unique
    return plan


# -------------------------------------------------------------------------------------------------- runners


def _jobs(args, plan):
    stage1 = [{"kind": "stage1", "seed": s} for s in args.seeds]
    prep = {(s, p): {"kind": "prep", "seed": s, "pool": p, "runs": plan[p]} for s in args.seeds for p in args.pools}
    train = {
        (s, p): [{"kind": "train", "seed": s, "pool": p, "rule": r, "fraction": f} for r, f in plan[p]]
        for s in args.seeds for p in args.pools
    }
    return stage1, prep, train


def run_in_process(args, plan, device) -> None:
    from replica_harness import Worker

    worker = Worker(args, device)
    stage1, prep, train = _jobs(args, plan)
    for job in stage1:
        _log_done(job, worker.run(job))
    for key, job in prep.items():
        _log_done(job, worker.run(job))
        for tjob in train[key]:
            _log_done(tjob, worker.run(tjob))


def run_in_pool(args, plan, workers: int) -> None:
    """Jobs on ``workers`` processes; a seed's pool jobs start when its base model exists, its training runs
    when its pool's selections exist."""
    import multiprocessing

    import replica_harness as harness

    stage1, prep, train = _jobs(args, plan)
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=harness.init_worker,
                             initargs=(asdict(args), threads)) as pool:
        pending = {pool.submit(harness.run_in_worker, job): job for job in stage1}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                result = future.result()
                _log_done(job, result)
                if job["kind"] == "stage1":
                    for p in args.pools:
                        nxt = prep[(job["seed"], p)]
                        pending[pool.submit(harness.run_in_worker, nxt)] = nxt
                elif job["kind"] == "prep":
                    for nxt in train[(job["seed"], job["pool"])]:
                        pending[pool.submit(harness.run_in_worker, nxt)] = nxt


def run_distributed(args, plan, device, rank: int, world: int) -> None:
    """Under a multi-process launch: base models shared out by seed, warmups run by all ranks together
    (data-parallel Trainer, feature rows split between ranks), training runs shared out round-robin."""
    from replica_harness import Worker

    from icons_hf.distributed import barrier

    worker = Worker(args, device, rank=rank)
    stage1, prep, train = _jobs(args, plan)
    for i, job in enumerate(stage1):
        if i % world == rank:
            _log_done(job, worker.run(job))
    barrier()
    for job in prep.values():
        _log_done(job, worker.run(job))
    barrier()
    everything = [job for jobs in train.values() for job in jobs]
    for i, job in enumerate(everything):
        if i % world == rank:
            _log_done(job, worker.run(job))
    barrier()


JOB_COUNTS = {"run": 0, "cached": 0}


def _log_done(job, result) -> None:
    JOB_COUNTS["cached" if result.get("cached") else "run"] += 1
    what = " ".join(f"{k}={v}" for k, v in job.items() if k not in ("kind", "runs"))
    extra = ""
    if job["kind"] == "train":
        extra = " ".join(f"{t}={a:.3f}" for t, a in result["accuracy"].items())
    logger.info("done %s %s (%.1fs) %s", job["kind"], what, result.get("job_wall_s", 0.0), extra)


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    import torch

    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for noisy in ("transformers", "datasets", "icons_hf", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started, load_before = time.perf_counter(), os.getloadavg()

    from icons_hf.distributed import barrier, init_distributed, launched_world_size

    world = launched_world_size()
    rank = 0
    if world > 1:
        init_distributed()
        import torch.distributed as dist

        rank = dist.get_rank()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    workers = args.workers or (1 if device.type == "cuda" else (os.cpu_count() or 1))
    if rank == 0:
        check_output_dir(args.output_dir, {k: getattr(args, k) for k in RESULT_FIELDS}, args.overwrite_output_dir)
        if world > 1 or workers > 1:
            _cache_pixels(args)
    barrier()
    plan = plan_runs(args)
    if world > 1:
        run_distributed(args, plan, device, rank, world)
        mode = f"accelerate launch, {world} processes"
    elif workers > 1:
        run_in_pool(args, plan, workers)
        mode = f"{workers} worker processes"
    else:
        run_in_process(args, plan, device)
        mode = "one process"
    if rank != 0:
        return {}
    import replica_report as report

    timing = {
        "wall_s": time.perf_counter() - started,
        "cpu_s": cpu_seconds(),
        "cpu_count": os.cpu_count(),
        "mode": mode,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "device": str(device),
        "jobs_run": JOB_COUNTS["run"],
        "jobs_cached": JOB_COUNTS["cached"],
    }
    timing["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    invocations = append_invocation(args.output_dir, timing)
    results = report.collect(args, plan, timing, invocations)
    paths = report.write(results, args.report_dir, args.report_name)
    if args.candidates:
        import candidates

        summary = report.candidate_summary(args, results, invocations, CANDIDATE_RULES)
        paths += candidates.write(summary, args.report_dir, "easy-VQA replica",
                                  f"python examples/replica/replica.py --candidates --pools {' '.join(args.pools)} "
                                  f"--workers 1 --report_name {args.report_name}")
    print(report.summary_text(results))
    print("\nReport: " + ", ".join(paths))
    return results


def _cache_pixels(args) -> None:
    """Process every easy-VQA image once and cache the tensors, so worker processes start fast."""
    from replica_harness import Material

    base = os.path.join(args.output_dir, "material", "pixels")
    if os.path.isfile(base + ".safetensors"):
        return
    os.makedirs(os.path.dirname(base), exist_ok=True)
    material = Material()
    material.image_rows([os.path.join(material.train_folder, r["image"]) for r in material.train_records]
                        + [os.path.join(material.test_folder, r["image"]) for r in material.test_records])
    material.save_pixels(base)


if __name__ == "__main__":
    main()
