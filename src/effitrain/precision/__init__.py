"""The `precision` group: fp32 (optionally TF32), bf16 and fp16 autocast, pure bf16, fp8 linears.

Schemas, checks, traits and each option's `Spec` here (no torch); builders in `effitrain.precision.build`. The spec
is the one place the dtypes of an option are worked out: its builder, the optimizer, the estimate and the FLOPs
peak all read it (`spec(cfg)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.errors import UsageError
from effitrain.parallel import FSDP_REDUCE
from effitrain.registry import Group, Need

GROUP = Group("precision", key="kind", builders="effitrain.precision.build")
DTYPES = ("float32", "bfloat16", "float16")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA = "cuda"  # trait the run's device provides when it is an NVIDIA GPU (checks.check_traits)
REPLACES_LINEARS = "replaces_linears"  # trait: the option swaps the model's nn.Linear modules for its own


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


@dataclass(frozen=True)
class Spec:
    """An option's dtypes, torch-free (the precision group's cost model).

    Args:
        param: parameters, gradients and (under bf16-pure) optimizer moments.
        compute: matmul outputs: the autocast dtype, or float32 without autocast.
        reduce: FSDP's gradient reduce-scatter dtype (other layouts reduce in `param`).
        peak: the datasheet column MFU divides by: float32, bfloat16, float16 or float8 (tf32 on CUDA: see peak_on).
        tf32: TF32 for the fp32 matmuls on CUDA.
        loss_scaling: dynamic loss scaling (fp16).
    """

    param: str = "float32"
    compute: str = "float32"
    reduce: str = "float32"
    peak: str = "float32"
    tf32: bool = False
    loss_scaling: bool = False

    @property
    def autocast(self) -> str | None:
        """The autocast dtype, None without autocast."""
        return None if self.compute == "float32" else self.compute

    def peak_on(self, *, cuda: bool) -> str:
        """The peak's datasheet column on this device: fp32 matmuls run in TF32 where allowed, on CUDA only."""
        return "tf32" if self.tf32 and cuda and self.peak == "float32" else self.peak

    def bytes(self, which: str) -> int:
        return BYTES[getattr(self, which)]


@GROUP.cost("fp32")
def _fp32(cfg) -> Spec:
    return Spec(tf32=cfg.tf32)


@GROUP.cost("bf16")
def _bf16(cfg) -> Spec:
    return Spec(compute="bfloat16", reduce=cfg.reduce_dtype, peak="bfloat16", tf32=cfg.tf32)


@GROUP.cost("fp16")
def _fp16(cfg) -> Spec:
    return Spec(compute="float16", reduce=cfg.reduce_dtype, peak="float16", tf32=cfg.tf32, loss_scaling=True)


@GROUP.cost("bf16-pure")
def _bf16_pure(cfg) -> Spec:
    return Spec(param="bfloat16", compute="bfloat16", reduce=cfg.reduce_dtype, peak="bfloat16", tf32=cfg.tf32)


@GROUP.cost("fp8")
def _fp8(cfg) -> Spec:
    return Spec(compute="bfloat16", reduce=cfg.reduce_dtype, peak="float8", tf32=cfg.tf32)


def spec(cfg) -> Spec:
    """The dtypes of the `precision` node's option."""
    return GROUP.cost_of(cfg.kind)(cfg)


def _reduce_in_fsdp(cfg, _run) -> list[Need]:
    """A reduce dtype other than the parameters' is FSDP's reduce-scatter dtype: other layouts reduce in the
    parameters' dtype."""
    param = spec(cfg).param
    if cfg.reduce_dtype == param:
        return []
    return [Need(FSDP_REDUCE, f"precision.reduce_dtype={cfg.reduce_dtype} is the FSDP reduce-scatter dtype; other "
                              f"layouts reduce gradients in the parameters' dtype ({param}): leave reduce_dtype="
                              f"{param} or use an FSDP layout")]


GROUP.traits("fp32")
GROUP.traits("bf16", needs=_reduce_in_fsdp)
GROUP.traits("fp16", needs=_reduce_in_fsdp)
GROUP.traits("bf16-pure", needs=lambda cfg, run: [
    Need("stochastic_rounding", "updates bf16 weights with stochastic rounding, which optimizer=adamw and "
                                "adamw-8bit have (use precision=bf16 with other optimizers)"),
    *_reduce_in_fsdp(cfg, run)])
# the capability check needs torch: the worker makes it at start (precision.build.check_fp8_device)
GROUP.traits("fp8", provides=(REPLACES_LINEARS,), needs=lambda cfg, run: [
    Need(CUDA, "needs a CUDA GPU with compute capability >= 8.9 (use precision=bf16)"), *_reduce_in_fsdp(cfg, run)])


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
