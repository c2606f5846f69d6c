"""Composed config -> the current process (world size 1, or already a torchrun worker) or torchrun workers."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from effitrain.distributed import in_torchrun_worker
from effitrain.errors import UsageError


def world_size(launcher) -> int:
    return launcher.nproc_per_node * launcher.nnodes


def launch(cfg: DictConfig, run_dir: Path) -> dict:
    """Train `cfg` into run_dir with the launch shape its `launcher` group asks for; returns the summary."""
    from effitrain.train import run

    if world_size(cfg.launcher) == 1 or in_torchrun_worker():
        return run(cfg, run_dir)
    raise UsageError(f"launcher world size {world_size(cfg.launcher)} needs the distributed launcher (not yet built)")
