"""The `compression` group: model and communication compression methods, each one or more ModelConverters
(converters.py). Several combine: `compression=[distill,qat-int8]` (Hydra's list selection); each chosen option's
keys live under its own kind (`compression.distill.alpha`, `compression.qat_int8.weight_dtype`).

Schemas and the group's own checks (which methods may combine) here, no torch; builders in
`effitrain.compression.build`, one module per method family (grad, lora, prune, distill, qat, share).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("compression", key="kind", builders="effitrain.compression.build", multi=True)


@GROUP.option("none")
@dataclass
class NoCompression:
    name: str = "none"
    kind: str = "none"


@GROUP.option("share_layers")
@dataclass
class ShareLayers:
    name: str = "share-layers"
    kind: str = "share_layers"
    every: int = 2  # each run of `every` consecutive blocks shares the first one's weights (ALBERT)


@GROUP.option("freeze")
@dataclass
class Freeze:
    name: str = "freeze"
    kind: str = "freeze"
    embeddings: bool = True  # freeze the token (and position) embeddings (and a tied LM head with them)
    blocks: int = 1  # freeze the first k transformer blocks


@GROUP.option("lora")
@dataclass
class Lora:
    name: str = "lora"
    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class QATBase:
    name: str = "qat-int8"
    kind: str = "qat_int8"
    start_step: int = 0  # optimizer steps trained in full precision before fake quantization starts


@GROUP.option("qat_int8")
@dataclass
class QATInt8(QATBase):
    weight_dtype: str = "int8"  # int8 (per output channel) or int4 (per group of group_size)
    group_size: int = 32  # used only by weight_dtype=int4


@GROUP.option("qat_int4")
@dataclass
class QATInt4(QATBase):
    name: str = "qat-int4"
    kind: str = "qat_int4"
    group_size: int = 32  # int4 weight-only, one scale per group of input channels


@GROUP.option("prune_magnitude")
@dataclass
class PruneMagnitude:
    name: str = "prune-magnitude"
    kind: str = "prune_magnitude"
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    start_step: int = 0  # first mask update
    end_step: int = 90  # the schedule reaches final_sparsity here (<= max_steps)
    frequency: int = 10  # steps between mask updates
    scope: str = "global"  # global: one magnitude threshold over all pruned weights; layer: one per weight


@GROUP.option("prune_2of4")
@dataclass
class Prune2of4:
    name: str = "prune-2of4"
    kind: str = "prune_2of4"
    start_step: int = 0  # the 2:4 masks are taken from the weights' magnitudes at this step, then kept


@GROUP.option("distill")
@dataclass
class Distill:
    name: str = "distill"
    kind: str = "distill"
    teacher: Optional[str] = None  # a local Hugging Face model directory with the run's tokenizer.json, or a run dir
    alpha: float = 0.5  # loss = (1 - alpha) CE + alpha T^2 KL(teacher || student)
    temperature: float = 2.0


@GROUP.option("grad_fp16")
@dataclass
class GradFP16:
    name: str = "grad-fp16"
    kind: str = "grad_fp16"
    dtype: str = "float16"  # float16 (any backend) or bfloat16 (CUDA + NCCL only)


@GROUP.option("grad_powersgd")
@dataclass
class GradPowerSGD:
    name: str = "grad-powersgd"
    kind: str = "grad_powersgd"
    rank: int = 2  # low-rank approximation rank of each gradient matrix
    start_iter: int = 10  # plain all-reduce before this step (PowerSGD's warm-up)
    error_feedback: bool = True  # carry each step's compression error into the next step
    warm_start: bool = True  # reuse last step's Q as the starting point of the power iteration
    min_compression_rate: float = 2.0  # matrices that would shrink less are all-reduced uncompressed


# pairs that cannot run together, and why
CONFLICTS = {
    frozenset({"lora", "freeze"}): "lora already freezes every base weight",
    frozenset({"lora", "prune_magnitude"}): "pruning would mask the frozen base weights LoRA adapts",
    frozenset({"lora", "prune_2of4"}): "pruning would mask the frozen base weights LoRA adapts",
    frozenset({"lora", "qat_int8"}): "QAT would fake-quantize the base weights under the adapters",
    frozenset({"lora", "qat_int4"}): "QAT would fake-quantize the base weights under the adapters",
    frozenset({"qat_int8", "qat_int4"}): "a weight has one quantization",
    frozenset({"prune_magnitude", "prune_2of4"}): "a weight has one sparsity pattern",
    frozenset({"qat_int8", "prune_magnitude"}): "QAT's fake-quantizers and the masks fight over the same weights",
    frozenset({"qat_int4", "prune_magnitude"}): "QAT's fake-quantizers and the masks fight over the same weights",
    frozenset({"qat_int8", "prune_2of4"}): "QAT's fake-quantizers and the masks fight over the same weights",
    frozenset({"qat_int4", "prune_2of4"}): "QAT's fake-quantizers and the masks fight over the same weights",
    frozenset({"grad_fp16", "grad_powersgd"}): "DDP takes one communication hook",
}


def chosen(cfg) -> list[str]:
    """The kinds of the chosen options ('none' chosen alone means none)."""
    return [k for k in cfg if k != "none"]


@GROUP.checks
def check(cfg) -> None:
    kinds = list(cfg)
    if "none" in kinds and len(kinds) > 1:
        raise UsageError(f"compression=none cannot combine with {', '.join(k for k in kinds if k != 'none')}: "
                         "leave none out of the list")
    for pair, why in CONFLICTS.items():
        if pair <= set(kinds):
            a, b = sorted(cfg[k].name for k in pair)
            raise UsageError(f"compression={a} and {b} cannot run together: {why}")
    for kind in kinds:
        _CHECKS.get(kind, lambda c: None)(cfg[kind])


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _check_share(c) -> None:
    _need(c.every >= 2, f"compression.share_layers.every={c.every} must be >= 2 (1 shares nothing)")


def _check_freeze(c) -> None:
    _need(c.blocks >= 0, f"compression.freeze.blocks={c.blocks} must be >= 0")
    _need(c.embeddings or c.blocks > 0, "compression=freeze with embeddings=false and blocks=0 freezes nothing")


def _check_lora(c) -> None:
    _need(c.rank > 0, f"compression.lora.rank={c.rank} must be a positive integer")
    _need(0 <= c.dropout < 1, f"compression.lora.dropout={c.dropout} must lie in [0, 1)")
    _need(len(c.target_modules) > 0, "compression.lora.target_modules is empty: name the Linear layers to adapt")


def _check_qat(c) -> None:
    _need(c.group_size > 0, f"compression.{c.kind}.group_size={c.group_size} must be a positive integer")
    _need(c.start_step >= 0, f"compression.{c.kind}.start_step={c.start_step} must be >= 0")
    if "weight_dtype" in c:
        _need(c.weight_dtype in ("int8", "int4"),
              f"compression.{c.kind}.weight_dtype={c.weight_dtype!r} is not one of: int8, int4")


def _check_prune_magnitude(c) -> None:
    k = "compression.prune_magnitude"
    _need(0 <= c.initial_sparsity <= c.final_sparsity < 1,
          f"{k}: need 0 <= initial_sparsity ({c.initial_sparsity}) <= final_sparsity ({c.final_sparsity}) < 1")
    _need(0 <= c.start_step < c.end_step, f"{k}: need 0 <= start_step ({c.start_step}) < end_step ({c.end_step})")
    _need(c.frequency > 0, f"{k}.frequency={c.frequency} must be a positive integer")
    _need(c.scope in ("global", "layer"), f"{k}.scope={c.scope!r} is not one of: global, layer")


def _check_prune_2of4(c) -> None:
    _need(c.start_step >= 0, f"compression.prune_2of4.start_step={c.start_step} must be >= 0")


def _check_distill(c) -> None:
    from pathlib import Path

    _need(c.teacher is not None, "compression=distill needs compression.distill.teacher=<local HF model directory "
          "or effitrain run directory>")
    teacher = Path(c.teacher).expanduser()
    _need((teacher / "config.json").is_file() or (teacher / ".hydra" / "config.yaml").is_file(),
          f"compression.distill.teacher={c.teacher}: neither a Hugging Face model directory (config.json) nor an "
          "effitrain run directory (.hydra/config.yaml)")
    if (teacher / "config.json").is_file():  # damaged or without weights: one line now, not a traceback at step 1
        from effitrain.model import check_hf_dir

        check_hf_dir(teacher, what=f"compression.distill.teacher={c.teacher}")
    _need(0 <= c.alpha <= 1, f"compression.distill.alpha={c.alpha} must lie in [0, 1]")
    _need(c.temperature > 0, f"compression.distill.temperature={c.temperature} must be > 0")


def _check_grad_fp16(c) -> None:
    _need(c.dtype in ("float16", "bfloat16"), f"compression.grad_fp16.dtype={c.dtype!r} is not one of: "
                                               "float16, bfloat16")


def _check_powersgd(c) -> None:
    k = "compression.grad_powersgd"
    _need(c.rank > 0, f"{k}.rank={c.rank} must be a positive integer")
    _need(c.start_iter >= 2, f"{k}.start_iter={c.start_iter} must be >= 2 (DDP rebuilds its buckets after step 1)")
    _need(c.min_compression_rate >= 1, f"{k}.min_compression_rate={c.min_compression_rate} must be >= 1")


_CHECKS = {"share_layers": _check_share, "freeze": _check_freeze, "lora": _check_lora, "qat_int8": _check_qat,
           "qat_int4": _check_qat, "prune_magnitude": _check_prune_magnitude, "prune_2of4": _check_prune_2of4,
           "distill": _check_distill, "grad_fp16": _check_grad_fp16, "grad_powersgd": _check_powersgd}

# the order converters apply in, whatever the order of the list: structure first (sharing), then what trains
# (freeze, adapters), then how weights are constrained (QAT, masks), then the loss, then communication
ORDER = ("none", "share_layers", "freeze", "lora", "qat_int8", "qat_int4", "prune_magnitude", "prune_2of4", "distill",
         "grad_fp16", "grad_powersgd")
