"""Process-group facts and the split of a fixed global batch over workers and micro-steps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def current_env() -> DistEnv:
    """The environment of an already initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def worker_shares(global_batch: int, world_size: int) -> List[int]:
    """Per-rank sample counts that add up to the global batch and differ by at most one."""
    if global_batch < world_size:
        raise ValueError(
            f"train.global_batch_size={global_batch} cannot be split over {world_size} workers; "
            "every worker needs at least one sample"
        )
    base, extra = divmod(global_batch, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


def rank_slice(global_batch: int, world_size: int, rank: int) -> Tuple[int, int]:
    """(offset, count) of this rank's share in global-batch order."""
    shares = worker_shares(global_batch, world_size)
    return sum(shares[:rank]), shares[rank]


def accumulation_steps(global_batch: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-steps per optimizer step; the same on every rank, since FSDP's collectives pair up."""
    largest_share = worker_shares(global_batch, world_size)[0]
    return -(-largest_share // micro_batch_size)


def micro_slices(offset: int, count: int, num_micro: int) -> List[Tuple[int, int]]:
    """Split [offset, offset + count) into num_micro contiguous pieces as equal as possible."""
    base, extra = divmod(count, num_micro)
    pieces, start = [], offset
    for i in range(num_micro):
        size = base + (1 if i < extra else 0)
        pieces.append((start, size))
        start += size
    return pieces
