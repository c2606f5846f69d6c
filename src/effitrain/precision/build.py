"""Builders of the `precision` group: autocast, dynamic loss scaling, parameter dtype, fp8 -- entry: build_precision.

Conversions of the model itself (bf16-pure's cast, fp8's float8 linears) are ModelConverters, applied by the trainer
with compression's before parallel wrapping.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from torch import nn

from effitrain.base.converters import ModelConverter
from effitrain.errors import UsageError
from effitrain.precision import DTYPES as DTYPE_NAMES
from effitrain.precision import GROUP, Spec, spec

log = logging.getLogger("effitrain")

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the schema's dtype names -> torch dtypes
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer have fp8 tensor cores


class PrecisionError(UsageError):
    """An impossible precision setting: reported as one line, exit code 2."""


class Precision:
    """What the loop needs from the precision group: a compute context, backward, a guarded step, converters.

    Args:
        device: the device the model trains on.
        spec: the option's dtypes (precision.Spec, the one place they are worked out).
        scaler: the dynamic loss scaler (disabled outside fp16).
        converters: model transforms this precision needs before parallel wrapping.
    """

    def __init__(self, *, device: torch.device, spec: Spec, scaler: torch.amp.GradScaler,
                 converters: list[ModelConverter] = ()):
        self.device, self.spec, self.scaler = device, spec, scaler
        self.autocast_dtype = DTYPES[spec.autocast] if spec.autocast else None
        self.param_dtype, self.reduce_dtype = DTYPES[spec.param], DTYPES[spec.reduce]
        self.peak_dtype = spec.peak_on(cuda=device.type == "cuda")  # the datasheet column MFU divides by
        self.converters = list(converters)

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

    def step(self, optimizer) -> None:
        """Step the optimizer unless gradients overflowed (the scaler then skips it and backs off its scale)."""
        if not self.scaler.is_enabled():
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def loss_scale(self) -> torch.Tensor | None:
        """The current loss scale as a device tensor (read without a host sync), or None without loss scaling.
        The scaler backs off exactly on the steps it skips, so a drop from one step to the next marks a skip."""
        if not self.scaler.is_enabled():
            return None
        scale = self.scaler._get_scale_async()  # get_scale() would .item() (a sync) every step
        if scale is None:  # made lazily at the first scale(): before it, the initial scale (a host float)
            return torch.tensor(self.scaler.get_scale(), dtype=torch.float32, device=self.device)
        return scale.detach().clone()


def build_precision(cfg, *, device: torch.device) -> Precision:
    """The precision policy of the `precision` group's kind; raises PrecisionError where the device lacks it (fp8).

    Args:
        cfg: the `precision` config group.
        device: the device the model trains on.
    """
    if cfg.tf32 and device.type != "cuda":
        log.info("precision tf32: TF32 exists only on CUDA; on %s this run's matmuls are plain fp32", device.type)
    return GROUP.builder_of(cfg.kind)(cfg, device=device)


def _scaler(device: torch.device, cfg=None) -> torch.amp.GradScaler:
    if cfg is None:
        return torch.amp.GradScaler(device.type, enabled=False)
    return torch.amp.GradScaler(device.type, init_scale=cfg.init_scale, growth_factor=cfg.growth_factor,
                                backoff_factor=cfg.backoff_factor, growth_interval=cfg.growth_interval)


@GROUP.builder("fp32")
def fp32(cfg, *, device):
    return Precision(device=device, spec=spec(cfg), scaler=_scaler(device))


@GROUP.builder("bf16")
def bf16(cfg, *, device):
    return Precision(device=device, spec=spec(cfg), scaler=_scaler(device))


@GROUP.builder("fp16")
def fp16(cfg, *, device):
    # FSDP2 shards are DTensors, whose unscale op agrees on found_inf across ranks: the plain scaler suffices
    return Precision(device=device, spec=spec(cfg), scaler=_scaler(device, cfg))


@GROUP.builder("bf16-pure")
def bf16_pure(cfg, *, device):
    # parameters are bf16 already; autocast keeps softmax, norms and the loss in fp32
    return Precision(device=device, spec=spec(cfg), scaler=_scaler(device),
                     converters=[CastParameters(torch.bfloat16)])


@GROUP.builder("fp8")
def fp8(cfg, *, device):
    linears = Float8Linears(recipe=cfg.fp8_recipe, min_features=cfg.fp8_min_features)
    check_fp8_device(device, option=cfg.name)
    return Precision(device=device, spec=spec(cfg), scaler=_scaler(device), converters=[linears])


class CastParameters(ModelConverter):
    """Store every parameter in one dtype (pure bf16: weights, grads and optimizer state in bf16)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def convert(self, model: nn.Module) -> nn.Module:
        return model.to(dtype=self.dtype)


class Float8Linears(ModelConverter):
    """Swap the large Linears for torchao's float8 training linears (the LM head stays in high precision)."""

    def __init__(self, *, recipe: str, min_features: int):
        self.recipe, self.min_features = recipe, min_features

    def convert(self, model: nn.Module) -> nn.Module:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        def keep_fp8(module: nn.Module, fqn: str) -> bool:
            # small matmuls lose more to the scaling/casting overhead than fp8 gains; fp8 kernels need dims % 16 == 0;
            # the LM head stays in high precision (its logits feed the softmax directly)
            return (isinstance(module, nn.Linear) and not fqn.endswith("lm_head")
                    and min(module.in_features, module.out_features) >= self.min_features
                    and module.in_features % 16 == 0 and module.out_features % 16 == 0)

        model = convert_to_float8_training(model, module_filter_fn=keep_fp8,
                                           config=Float8LinearConfig.from_recipe_name(self.recipe))
        converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
        log.info("precision fp8 (%s): %d linear layers converted to float8, the rest stay bf16", self.recipe, converted)
        return model


def check_fp8_device(device: torch.device, *, option: str = "fp8") -> None:
    """fp8 matmuls (torch._scaled_mm) need CUDA compute capability >= 8.9 and torchao."""
    import importlib.util

    if device.type != "cuda":
        raise PrecisionError(f"precision={option} needs a CUDA GPU with compute capability >= 8.9 (H100, L4, "
                             f"RTX 4090); this run's device is {device.type} (use precision=bf16 there)")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise PrecisionError(f"precision={option} needs CUDA compute capability >= 8.9; "
                             f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]} "
                             "(use precision=bf16)")
    if importlib.util.find_spec("torchao") is None:
        raise PrecisionError(f"precision={option} needs torchao: pip install 'effitrain[ao]'")
