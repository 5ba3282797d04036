"""Process helpers that work with and without torch.distributed (as set up by accelerate or torchrun)."""

from __future__ import annotations

import logging
import os

import torch.distributed as dist

logger = logging.getLogger(__name__)


def launched_world_size() -> int:
    """The number of processes a launcher (``accelerate launch``, ``torchrun``) started, from ``WORLD_SIZE``."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE={value!r} is not an integer.") from None


_warned_single = False


def lost_processes() -> bool:
    """Whether a launcher was asked for several processes but started this one alone: ``accelerate launch --cpu
    --num_processes 2`` runs its one-process launcher, which sets ``MASTER_PORT`` (asked for several) and
    ``ACCELERATE_USE_CPU`` but no ``WORLD_SIZE``."""
    env = os.environ
    return "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env


def warn_lost_processes() -> None:
    """Log once, on this (only) process, that the run has one process although several were asked for."""
    global _warned_single
    if _warned_single or not lost_processes():
        return
    _warned_single = True
    logger.warning(
        "accelerate launch was asked for several processes but this run has one: with --cpu it starts a single "
        "process, which computes every row. For several CPU processes use 'accelerate launch --multi_gpu "
        "--num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no ...' or "
        "'torchrun --nproc_per_node 2 ...'."
    )


def init_distributed() -> None:
    """Join the process group that ``accelerate launch``/``torchrun`` describe in the environment, if not joined.

    Without this, every process of a launched job would believe it is alone and compute every row. A launch that
    asked for several processes but started one is logged as a warning (:func:`warn_lost_processes`).
    """
    if not dist.is_available() or dist.is_initialized():
        return
    if launched_world_size() <= 1:
        warn_lost_processes()
        return
    import torch
    from accelerate import PartialState

    # Without a GPU, accelerate only picks its multi-process CPU mode (gloo) when asked for the CPU explicitly.
    PartialState(cpu=not torch.cuda.is_available())
    if not dist.is_initialized():
        raise RuntimeError(
            f"WORLD_SIZE={launched_world_size()} says this process is one of several, but no torch.distributed "
            "process group could be set up; call torch.distributed.init_process_group() (or create an "
            "accelerate.Accelerator) before computing features."
        )
    logger.info("Joined the process group: rank %d of %d.", dist.get_rank(), dist.get_world_size())


def process_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a distributed job."""
    init_distributed()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return process_info()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
