"""apply_parallel: place the model on its device and wrap it for the chosen parallel strategy."""

from __future__ import annotations

from torch import nn

from effitrain.errors import UsageError


class ParallelError(UsageError):
    """An impossible parallel layout: reported as one line, exit code 2."""


def apply_parallel(model: nn.Module, *, cfg, world, precision) -> nn.Module:
    """Wrap `model` for the `parallel` group's strategy.

    Args:
        model: the freshly built model (on CPU).
        cfg: the `parallel` config group.
        world: the process's World (rank, size, device).
        precision: the run's Precision (parameter dtype, FSDP mixed-precision policy).
    """
    if cfg.strategy == "single":
        return model.to(device=world.device, dtype=precision.param_dtype)
    raise ParallelError(f"parallel.strategy={cfg.strategy!r} is not available")
