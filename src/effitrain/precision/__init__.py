"""The `precision` group: fp32 (optionally TF32), bf16 and fp16 autocast, pure bf16, fp8 linears.

Schemas and checks here (no torch); builders in `effitrain.precision.build`.
"""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("precision", key="kind", builders="effitrain.precision.build")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PrecisionBase:
    name: str = "fp32"
    kind: str = "fp32"
    tf32: bool = False  # allow TF32 for the fp32 matmuls on CUDA (Ampere+); CPUs have none


@GROUP.option("fp32")
@dataclass
class FP32Precision(PrecisionBase):
    kind: str = "fp32"


@dataclass
class AutocastPrecision(PrecisionBase):
    reduce_dtype: str = "float32"  # FSDP: the dtype of the gradient reduce-scatter (other layouts: the param dtype)


@GROUP.option("bf16")
@dataclass
class BF16Precision(AutocastPrecision):
    kind: str = "bf16"  # autocast bf16, fp32 master weights


@GROUP.option("fp16")
@dataclass
class FP16Precision(AutocastPrecision):
    kind: str = "fp16"  # autocast fp16, fp32 master weights, dynamic loss scaling
    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000


@GROUP.option("bf16-pure")
@dataclass
class PureBF16Precision(AutocastPrecision):
    kind: str = "bf16-pure"  # bf16 weights, grads and optimizer state; stochastic-rounding updates
    reduce_dtype: str = "bfloat16"


@GROUP.option("fp8")
@dataclass
class FP8Precision(AutocastPrecision):
    kind: str = "fp8"  # torchao float8 linears inside bf16 autocast
    fp8_recipe: str = "tensorwise"  # tensorwise | rowwise
    fp8_min_features: int = 256  # linear layers smaller than this stay in bf16


@GROUP.checks
def check(cfg) -> None:
    if "reduce_dtype" in cfg and cfg.reduce_dtype not in DTYPES:
        raise UsageError(f"precision.reduce_dtype={cfg.reduce_dtype!r} is not one of: {', '.join(DTYPES)}")
    if cfg.kind == "fp16" and not (0 < cfg.backoff_factor < 1 < cfg.growth_factor and cfg.growth_interval > 0
                                   and cfg.init_scale > 0):
        raise UsageError("precision: loss scaling needs 0 < backoff_factor < 1 < growth_factor, growth_interval > 0, "
                         "init_scale > 0")
    if cfg.kind == "fp8" and cfg.fp8_recipe not in ("tensorwise", "rowwise"):
        raise UsageError(f"precision.fp8_recipe={cfg.fp8_recipe!r} is not one of: tensorwise, rowwise")


def param_dtype(cfg) -> str:
    """The dtype the parameters are stored in (bf16 for bf16-pure, else fp32)."""
    return "bfloat16" if cfg.kind == "bf16-pure" else "float32"
