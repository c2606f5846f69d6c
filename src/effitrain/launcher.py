"""The `launcher` group: how many worker processes on how many nodes, and how torch's elastic agent starts them.

Schema and checks here (no torch); the builder (starting the workers) is effitrain.launch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("launcher", key=None, builders="effitrain.launch")
START_METHODS = ("auto", "spawn", "fork", "forkserver")


@GROUP.option("launcher")
@dataclass
class LauncherConfig:
    nproc_per_node: int = 1  # worker processes on this node (one per GPU)
    nnodes: int = 1
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None  # host:port of the rendezvous; None = a free local port (one node only)
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
                         "(a node every node can reach)")


def world_size(launcher) -> int:
    """Processes the launcher group asks for (every node's workers)."""
    return launcher.nproc_per_node * launcher.nnodes


def in_torchrun_worker() -> bool:
    """True inside a process started by torchrun, the elastic agent or srun+torchrun (RANK is set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
