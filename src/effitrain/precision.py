"""Numeric precision: autocast, dynamic loss scaling, parameter dtype, fp8 -- one entry point, build_precision."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from torch import nn

from effitrain.errors import UsageError

log = logging.getLogger("effitrain")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer have fp8 tensor cores


class PrecisionError(UsageError):
    """An impossible precision setting: reported as one line, exit code 2."""


class Precision:
    """What the loop needs from the precision group: a compute context, backward, and a guarded step."""

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.autocast_dtype = DTYPES[cfg.autocast_dtype] if cfg.autocast_dtype else None
        self.param_dtype = DTYPES[cfg.param_dtype]
        self.reduce_dtype = DTYPES[cfg.reduce_dtype]
        # FSDP2 shards are DTensors, whose unscale op agrees on found_inf across ranks: the plain scaler suffices
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

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Cast parameters (bf16-pure) or swap linears for float8 ones (fp8); runs before parallel wrapping,
        so FSDP shards the converted weights and TP sees the float8 modules."""
        if self.cfg.fp8_recipe:
            model = _convert_float8(model, recipe=self.cfg.fp8_recipe, min_features=self.cfg.fp8_min_features)
        return model.to(dtype=self.param_dtype)

    def fsdp_mixed_precision(self):
        """FSDP2's MixedPrecisionPolicy for autocast options (low-precision all-gathers and compute, reduce in
        reduce_dtype); None without autocast (fp32, tf32): parameters then are the compute dtype."""
        if self.autocast_dtype is None:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=self.reduce_dtype)

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
    """The precision policy for this run; raises PrecisionError where the device lacks the dtype (fp8).

    Args:
        cfg: the `precision` config group.
        device: the device the model trains on.
    """
    if cfg.fp8_recipe:
        check_fp8_device(device)
    # set both ways: sweep jobs and reproduce share one process, and a tf32 job must not leak into the next
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32 and device.type == "cuda")
    if cfg.tf32 and device.type != "cuda":
        log.info("precision tf32: TF32 exists only on CUDA; on %s this run is plain fp32", device.type)
    return Precision(cfg, device)


def check_fp8_device(device: torch.device) -> None:
    """fp8 matmuls (torch._scaled_mm) need CUDA compute capability >= 8.9 and torchao."""
    if device.type != "cuda":
        raise PrecisionError(f"precision=fp8 needs a CUDA GPU with compute capability >= 8.9 (H100, L4, RTX 4090); "
                             f"this run's device is {device.type} (use precision=bf16 there)")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise PrecisionError(f"precision=fp8 needs CUDA compute capability >= 8.9; {torch.cuda.get_device_name(device)}"
                             f" has {capability[0]}.{capability[1]} (use precision=bf16)")
    _need_torchao("precision=fp8")


def _convert_float8(model: nn.Module, *, recipe: str, min_features: int) -> nn.Module:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def keep_fp8(module: nn.Module, fqn: str) -> bool:
        # small matmuls lose more to the scaling/casting overhead than fp8 gains; fp8 kernels need dims % 16 == 0;
        # the LM head stays in high precision (its logits feed the softmax directly)
        return (isinstance(module, nn.Linear) and not fqn.endswith("lm_head")
                and min(module.in_features, module.out_features) >= min_features
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    model = convert_to_float8_training(model, module_filter_fn=keep_fp8,
                                       config=Float8LinearConfig.from_recipe_name(recipe))
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    log.info("precision fp8 (%s): %d linear layers converted to float8, the rest stay bf16", recipe, converted)
    return model


def _need_torchao(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise PrecisionError(f"{what} needs torchao: pip install 'effitrain[ao]'")
