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


def init_distributed() -> None:
    """Join the process group that ``accelerate launch``/``torchrun`` describe in the environment, if not joined.

    Without this, every process of a launched job would believe it is alone and compute every row.
    """
    if not dist.is_available() or dist.is_initialized() or launched_world_size() <= 1:
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
