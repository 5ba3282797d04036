"""What the two quality replicas (``replica.py``, easy-VQA, and ``replica_many.py``, many tasks) share: the guard
on a reused output_dir, the invocation log, the per-process job cache, and the fixed-budget training loop that
judges a selection (its batch order and its AdamW schedule)."""

from __future__ import annotations

import json
import os
import resource
import shutil
from collections.abc import Callable, Iterator

import torch


def check_output_dir(output_dir: str, current: dict, overwrite: bool) -> None:
    """Refuse to mix results of different arguments in one output_dir: ``current`` (the settings that change what
    a finished job computed) must equal the ones saved there, unless ``overwrite``, which deletes the seeds'
    results and starts over. Saves ``current`` for the next run."""
    path = os.path.join(output_dir, "replica_args.json")
    if os.path.isfile(path):
        with open(path) as handle:
            saved = json.load(handle)
        # A setting recorded before but no longer an argument also counts: rule names may have meant other things.
        diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted({*saved, *current})
                 if saved.get(k) != current.get(k)]
        if diffs and not overwrite:
            raise ValueError(f"{output_dir} holds results made with other arguments ({'; '.join(diffs)}). Pass "
                             "another --output_dir, or --overwrite_output_dir to delete them and start over.")
        for entry in os.listdir(output_dir) if diffs else []:
            if entry.startswith("seed"):
                shutil.rmtree(os.path.join(output_dir, entry))
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(current, handle, indent=1)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def append_invocation(output_dir: str, timing: dict) -> list[dict]:
    """Append ``timing`` to ``<output_dir>/invocations.json``; returns every invocation recorded so far."""
    path = os.path.join(output_dir, "invocations.json")
    invocations = []
    if os.path.isfile(path):
        with open(path) as handle:
            invocations = json.load(handle)
    invocations.append(timing)
    with open(path, "w") as handle:
        json.dump(invocations, handle, indent=1)
    return invocations


def quiet_logging() -> None:
    """The replica scripts' log format, without progress bars or the libraries' info lines."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    _quiet_libraries()


def _quiet_libraries() -> None:
    """No progress bars, and only warnings from the libraries."""
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")
    for noisy in ("transformers", "datasets", "icons_hf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_WORKER = None  # the job runner of a spawned worker process (run_job_graph)


def _init_worker(worker_class, args: dict) -> None:
    """A spawned worker: one torch thread, no progress bars or library info lines, one ``worker_class(args)``."""
    global _WORKER
    torch.set_num_threads(1)
    _quiet_libraries()
    _WORKER = worker_class(args)


def _run_in_worker(job: dict) -> dict:
    return _WORKER.run(job)


def run_job_graph(worker_class, args: dict, first: list[dict], after: Callable[[dict], list[dict]], workers: int,
                  logger, hidden: tuple[str, ...] = ()) -> dict:
    """Runs ``first`` and then, as each job finishes, the jobs ``after(job)`` names, on ``workers`` spawned
    processes that each hold one ``worker_class(args)`` and call its ``run(job)``; logs each finished job (without
    the ``hidden`` keys) and returns how many ran and how many were cached."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    counts = {"run": 0, "cached": 0}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(worker_class, args)) as pool:
        pending = {pool.submit(_run_in_worker, job): job for job in first}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                result = future.result()
                counts["cached" if result.get("cached") else "run"] += 1
                what = " ".join(f"{k}={v}" for k, v in job.items() if k not in ("kind", *hidden))
                logger.info("done %s %s (%.1fs)%s", job["kind"], what, result["job_wall_s"],
                            " cached" if result.get("cached") else "")
                for n in after(job):
                    pending[pool.submit(_run_in_worker, n)] = n
    return counts


def invocation_timing(started: float, load_before, workers: int, counts: dict, seeds) -> dict:
    """One invocation's cost record (``append_invocation``): wall and CPU seconds, workers, load, jobs."""
    import time

    return {"wall_s": time.perf_counter() - started, "cpu_s": cpu_seconds(), "workers": workers,
            "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "jobs_run": counts["run"], "jobs_cached": counts["cached"], "seeds": seeds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


class JobCache:
    """Per-process memo of the pieces jobs rebuild (splits, base models, pools, test sets), keyed by tuples."""

    def __init__(self):
        self._memo: dict = {}

    def cached(self, key, build: Callable):
        """``build()`` the first time ``key`` is asked for, the stored value after."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def linear_schedule(optimizer, steps: int, warmup: float = 0.1):
    """Linear warmup over the first ``warmup`` share of the steps, then linear decay to zero."""
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fixed_step_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of row indices in ``range(n)`` that cycle through reshuffled epochs (``torch.randperm``
    with a generator seeded by ``seed``); a batch that reaches the end of an epoch is filled from the next one, so
    a subset smaller than a batch repeats rows within it. The position in the new epoch stops at its end: the
    easy-VQA replica's old loop let it run past the end, which gives the same batches (the rows taken from an epoch
    past its end are none, and the next batch starts a new epoch either way)."""
    generator = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            take = order[pos:]
            order = torch.randperm(n, generator=generator)
            pos = min(n, batch_size - len(take))
            batch = torch.cat([take, order[:pos]])
        else:
            batch, pos = order[pos : pos + batch_size], pos + batch_size
        yield batch


def fixed_step_training(model, batch_loss: Callable[[torch.Tensor], torch.Tensor], n: int, *, steps: int,
                      batch_size: int, lr: float, seed: int) -> float:
    """AdamW (no weight decay) on the trainable parameters with linear warmup/decay for exactly ``steps`` steps
    on the batches of :func:`fixed_step_batches` (the same seed for every rule, so only the rows differ);
    ``batch_loss(indices)`` returns the loss of those rows. Returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = linear_schedule(optimizer, steps)
    model.train()
    loss = torch.zeros(())
    for batch in fixed_step_batches(n, batch_size, steps, seed):
        loss = batch_loss(batch)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
