"""Process helpers that work with and without torch.distributed (as set up by accelerate or torchrun)."""

from __future__ import annotations

import torch.distributed as dist


def process_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a distributed job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return process_info()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
