"""Process-group set-up and the few collectives the trainer needs (world size 1 needs none)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def in_torchrun_worker() -> bool:
    """True inside a process started by torchrun, the elastic agent or srun+torchrun (RANK is set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if choice == "cuda" else torch.device("cpu")


def init_world(device_choice: str) -> World:
    """Join the process group when started as a worker (nccl on CUDA, gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return World(rank=rank, local_rank=local_rank, size=size, device=device)


def all_reduce(values: list[float], *, op: str, world: World) -> list[float]:
    """Reduce a few floats across ranks in one collective ('sum', 'max' or 'mean')."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= world.size
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
