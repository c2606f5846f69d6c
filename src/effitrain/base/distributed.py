"""Process-group set-up and the few collectives the trainer needs (world size 1 needs none)."""

from __future__ import annotations

import os
import time
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


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if choice == "cuda" else torch.device("cpu")


def init_world(device_choice: str, *, group: bool = False) -> World:
    """Join the process group when started as a worker (nccl on CUDA, gloo on CPU).

    Args:
        device_choice: the `device` key: auto, cpu or cuda (cuda:LOCAL_RANK).
        group: also make a one-process group when there is no launcher (world size 1), so a
            ddp/fsdp layout runs unchanged in one process.
    """
    rank = int(os.environ.get("RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (size > 1 or group) and not dist.is_initialized():
        # CUDA: nccl for GPU tensors, plus gloo for the CPU ones FSDP's cpu offload reduces (grad-norm of host shards)
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        if size > 1:
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(rank=rank, local_rank=local_rank, size=size, device=device)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when `flag` is true on any (one tiny CPU all-reduce: gloo, also next to nccl)."""
    if not world.distributed:
        return flag
    box = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def record_failure(error: BaseException) -> None:
    """Write this rank's error where torchrun reads it (TORCHELASTIC_ERROR_FILE), now, from its except block: a rank
    failing alone aborts its group next (close_world), its peers fail at once on the lost connections, and their
    errors must not be all the launcher hears (launcher.launch._failure_message ranks a lost peer last)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(error)


def close_world(*, together: bool = True) -> None:
    """Leave the process group without the gloo teardown deadlock.

    gloo's worker threads free each finished collective's tensors, and freeing a tensor made in Python
    takes the GIL; destroying the group joins those threads while holding the GIL. So first drain them:
    a barrier queues behind the last collective, and a short sleep gives up the GIL while they finish.

    together=False (this rank failed, perhaps alone): the other ranks may be waiting for it inside a collective
    that will never complete, and would never reach the barrier, so the job would hang until the collective
    timeout (gloo's default: 30 minutes). Abort the group instead: its pending work fails here at once, this rank
    exits with its error, its peers' collectives fail on the closed connections, and torchrun stops the job.
    """
    if dist.is_initialized() and not together and dist.get_world_size() > 1:
        dist.distributed_c10d._abort_process_group()
        return
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
            time.sleep(0.1)
        dist.destroy_process_group()
