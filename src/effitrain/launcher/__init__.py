"""The `launcher` group: how many worker processes on how many nodes, and how torch's elastic agent starts them.

Schema and checks here (no torch); the builder (starting the workers) is effitrain.launcher.launch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("launcher", key=None, builders="effitrain.launcher.launch",
              standalone="the launcher starts the processes: the world size it asks for is what the layout and the "
                         "estimate divide by")
START_METHODS = ("auto", "spawn", "fork", "forkserver")


@GROUP.option("launcher")
@dataclass
class LauncherConfig:
    nproc_per_node: int = 1  # worker processes on this node (one per GPU)
    nnodes: int = 1
    rdzv_backend: str = "c10d"
    # host:port of the rendezvous; None = a free local port (one node only); "slurm" = the allocation's first node
    rdzv_endpoint: Optional[str] = None
    rdzv_id: str = "effitrain"  # job id shared by all nodes of one job
    max_restarts: int = 0  # restarts of the whole worker group after a failure
    monitor_interval: float = 0.5  # seconds between the agent's health checks of its workers
    start_method: str = "auto"  # auto | spawn | fork | forkserver: auto = forkserver on CPU, spawn with CUDA


@GROUP.checks
def check(cfg) -> None:
    if cfg.nproc_per_node < 1 or cfg.nnodes < 1:
        raise UsageError(f"launcher.nproc_per_node={cfg.nproc_per_node} and launcher.nnodes={cfg.nnodes} "
                         "must be >= 1")
    if cfg.start_method not in START_METHODS:
        raise UsageError(f"launcher.start_method={cfg.start_method!r} is not one of: {', '.join(START_METHODS)}")
    if cfg.nnodes > 1 and cfg.rdzv_endpoint is None:
        raise UsageError(f"launcher.nnodes={cfg.nnodes} needs launcher.rdzv_endpoint=HOST:PORT "
                         "(a node every node can reach), or =slurm inside a SLURM allocation")


def world_size(launcher) -> int:
    """Processes the launcher group asks for (every node's workers)."""
    return launcher.nproc_per_node * launcher.nnodes


def in_torchrun_worker() -> bool:
    """True inside a process started by torchrun, the elastic agent or srun+torchrun (RANK is set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


SLURM_PORT = 29500


def slurm_rendezvous(env=os.environ) -> tuple[str, str]:
    """(endpoint, id) of `rdzv_endpoint=slurm`: the allocation's first node, port 29500, and the SLURM job id (one
    rendezvous per job, so the array tasks of a sweep never meet)."""
    if "SLURM_JOB_NODELIST" not in env or "SLURM_JOB_ID" not in env:
        raise UsageError("launcher.rdzv_endpoint=slurm runs inside a SLURM allocation (SLURM_JOB_NODELIST is not "
                         "set here); give HOST:PORT instead")
    return f"{first_host(env['SLURM_JOB_NODELIST'])}:{SLURM_PORT}", f"slurm-{env['SLURM_JOB_ID']}"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu-[003-005,009],cpu1` -> gpu-003 (what `scontrol show hostnames`
    prints first)."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    if "[" not in first:
        return first
    prefix, ranges = first.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]
