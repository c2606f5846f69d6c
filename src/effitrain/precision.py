"""Numeric precision: autocast, dynamic loss scaling, parameter dtype -- one entry point, build_precision."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from effitrain.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PrecisionError(UsageError):
    """An impossible precision setting: reported as one line, exit code 2."""


class Precision:
    """What the loop needs from the precision group: a compute context, backward, and a guarded step."""

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.autocast_dtype = DTYPES[cfg.autocast_dtype] if cfg.autocast_dtype else None
        self.param_dtype = DTYPES[cfg.param_dtype]
        self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg.init_scale, growth_factor=cfg.growth_factor,
                                           backoff_factor=cfg.backoff_factor, growth_interval=cfg.growth_interval,
                                           enabled=cfg.loss_scaling)
        self.skipped_steps = 0

    @property
    def peak_dtype(self) -> str:
        """The dtype whose peak FLOP/s MFU is measured against."""
        if self.cfg.fp8_recipe:
            return "float8"
        if self.autocast_dtype is not None:
            return self.cfg.autocast_dtype
        if self.param_dtype != torch.float32:
            return self.cfg.param_dtype
        return "tf32" if self.cfg.tf32 and self.device.type == "cuda" else "float32"

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer) -> None:
        """Bring gradients back to true scale before clipping (no-op without loss scaling)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """Step the optimizer unless gradients overflowed; True when the step was taken."""
        if not self.scaler.is_enabled():
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        taken = self.scaler.get_scale() >= before  # the scaler backs off exactly when it skipped
        self.skipped_steps += not taken
        return taken

    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler.is_enabled() else None


def build_precision(cfg, *, device: torch.device) -> Precision:
    """The precision policy for this run.

    Args:
        cfg: the `precision` config group.
        device: the device the model trains on.
    """
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Precision(cfg, device)
