"""Pruning: masks on the Linear weights of the transformer blocks, kept exactly zero after every optimizer step.
Two methods: `prune_magnitude` (gradual magnitude pruning, Zhu & Gupta 2017) and `prune_2of4` (2:4 semi-structured
sparsity, fixed once). The masks themselves (the converter, the thresholds) are torch code: masks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from effitrain.base.converters import ModelConverter
from effitrain.compression.method import GROUP, MASKS, WEIGHTS, Cost
from effitrain.errors import UsageError
from effitrain.parallel import CONVERTED_MODULES
from effitrain.registry import Need


@GROUP.option("prune_magnitude", order=WEIGHTS + 2)
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


@GROUP.option("prune_2of4", order=WEIGHTS + 3)
@dataclass
class Prune2of4:
    name: str = "prune-2of4"
    kind: str = "prune_2of4"
    start_step: int = 0  # the 2:4 masks are taken from the weights' magnitudes at this step, then kept


@GROUP.check_of("prune_magnitude")
def check_magnitude(node, cfg) -> None:
    k = "compression.prune_magnitude"
    if not 0 <= node.initial_sparsity <= node.final_sparsity < 1:
        raise UsageError(f"{k}: need 0 <= initial_sparsity ({node.initial_sparsity}) <= final_sparsity "
                         f"({node.final_sparsity}) < 1")
    if not 0 <= node.start_step < node.end_step:
        raise UsageError(f"{k}: need 0 <= start_step ({node.start_step}) < end_step ({node.end_step})")
    if node.frequency <= 0:
        raise UsageError(f"{k}.frequency={node.frequency} must be a positive integer")
    if node.scope not in ("global", "layer"):
        raise UsageError(f"{k}.scope={node.scope!r} is not one of: global, layer")
    if node.end_step > cfg.max_steps:
        raise UsageError(f"{k}.end_step={node.end_step} is past max_steps={cfg.max_steps}: the run would end before "
                         "reaching final_sparsity")


@GROUP.check_of("prune_2of4")
def check_2of4(node, cfg) -> None:
    if node.start_step < 0:
        raise UsageError(f"compression.prune_2of4.start_step={node.start_step} must be >= 0")


_TRAITS = dict(provides=(MASKS,), needs=(
    Need(CONVERTED_MODULES, "masks are kept on whole weights or 1-D FSDP shards only"),
), excludes=(Need(MASKS, "a weight has one sparsity pattern"),))
GROUP.traits("prune_magnitude", **_TRAITS)
GROUP.traits("prune_2of4", **_TRAITS)


def cubic_sparsity(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3, flat outside [t0, t_end]."""
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


@GROUP.builder("prune_magnitude")
def build_magnitude(cfg, *, context) -> list[ModelConverter]:
    from effitrain.compression.masks import Pruner, local, magnitude_threshold

    def update_at(step: int) -> bool:
        return cfg.start_step <= step <= cfg.end_step and ((step - cfg.start_step) % cfg.frequency == 0
                                                            or step == cfg.end_step)

    def masks_for(weights, step):
        s = cubic_sparsity(step, initial=cfg.initial_sparsity, final=cfg.final_sparsity, start=cfg.start_step,
                           end=cfg.end_step)
        if cfg.scope == "global":
            t = magnitude_threshold(weights, s)
            return [local(w).abs() >= t for w in weights]
        return [local(w).abs() >= magnitude_threshold([w], s) for w in weights]

    return [Pruner(masks_for=masks_for, update_at=update_at)]


@GROUP.builder("prune_2of4")
def build_2of4(cfg, *, context) -> list[ModelConverter]:
    from effitrain.compression.masks import Pruner, local, two_of_four_mask

    def masks_for(weights, step):
        return [two_of_four_mask(local(w)) for w in weights]

    return [Pruner(masks_for=masks_for, update_at=lambda step: step == max(cfg.start_step, 1))]


def _mark_pruned(model, params: list, node) -> list:
    """The weights the masks cover (masks.prunable, read off the meta model)."""
    from effitrain.compression.masks import prunable

    ids = {id(w) for w in prunable(model)}
    pruned = {name for name, p in model.named_parameters() if id(p) in ids}
    return [replace(p, pruned=p.name in pruned) for p in params]


def _masks(node, inputs) -> dict[str, int]:
    masked = sum(n for p, n in zip(inputs.params, inputs.numels, strict=True) if p.pruned)
    # one bool per element of this rank's piece of each pruned weight
    return {"pruning_masks": masked} if masked else {}


_COST = Cost(params=_mark_pruned, memory=_masks, held=("pruning_masks",))
GROUP.cost("prune_magnitude")(_COST)
GROUP.cost("prune_2of4")(_COST)
