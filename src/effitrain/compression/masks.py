"""Pruning's masks, torch-side (the `prune_magnitude` and `prune_2of4` methods are registered in prune.py): masks on
the Linear weights of the transformer blocks, re-applied after every optimizer step so pruned weights stay exactly
zero (the optimizer's dense update would otherwise revive them).

Masks are kept by this converter on each rank's own piece of a weight: the whole weight under single/DDP (every
rank holds the same values, so every rank computes the same mask), the local shard of an FSDP DTensor (magnitude
thresholds are found by bisection over all-reduced counts, so no rank gathers a full weight). torch.nn.utils.prune
is not used: it fails after `fully_shard`, keeps a full-size mask per rank before it, and compounds when re-applied.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from effitrain.base.converters import ModelConverter
from effitrain.model.build import transformer_blocks

BISECTION_STEPS = 40  # halvings of the magnitude range: the threshold to ~1e-12 of the largest weight


def prunable(model: nn.Module) -> list[torch.Tensor]:
    """The weights pruned: every Linear weight inside the transformer blocks (embeddings, norms, LM head kept)."""
    inner = getattr(model, "module", model)  # DDP
    seen, weights = set(), []
    for module in transformer_blocks(inner).modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            weights.append(module.weight)
    return weights


def local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _group(p: torch.Tensor):
    """The process group whose ranks hold the other shards of `p` (None: every rank holds all of it)."""
    return p.device_mesh.get_group() if hasattr(p, "device_mesh") else None


def _count(tensors: list[torch.Tensor], group, fn) -> int:
    total = sum(fn(t) for t in tensors).to(torch.float64)
    if group is not None:
        dist.all_reduce(total, group=group)
    return int(total.item())


def magnitude_threshold(weights: list[torch.Tensor], sparsity: float) -> float:
    """The magnitude below which a `sparsity` fraction of the weights' elements lie (all shards together)."""
    pieces, group = [local(w).detach().abs() for w in weights], _group(weights[0])
    total = _count(pieces, group, lambda t: torch.tensor(t.numel()))
    lo, hi = 0.0, float(_max(pieces, group))
    target = sparsity * total
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        below = _count(pieces, group, lambda t, m=mid: (t < m).sum())
        lo, hi = (mid, hi) if below < target else (lo, mid)
    return hi


def _max(pieces: list[torch.Tensor], group) -> torch.Tensor:
    m = torch.stack([t.max() if t.numel() else t.new_zeros(()) for t in pieces]).max().to(torch.float64)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m


def two_of_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every 4 consecutive inputs of each output row (rows are whole on every
    rank: FSDP shards dim 0)."""
    w = weight.detach().abs().reshape(-1, 4)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.topk(2, dim=1).indices, True)
    return keep.reshape(weight.shape)


class Pruner(ModelConverter):
    """Masks updated on the steps `update_at(step)` names and applied after every optimizer step.

    Args:
        masks_for: `(weights, step) -> list of local masks`, called on update steps.
        update_at: `step -> bool`.
    """

    def __init__(self, *, masks_for, update_at):
        self.masks_for, self.update_at = masks_for, update_at
        self.step, self.masks, self.sparsity = 0, None, 0.0
        self.weights: list[torch.Tensor] | None = None

    @torch.no_grad()
    def post_optimizer_hook(self, model: nn.Module) -> None:
        self.step += 1
        if self.weights is None:
            self.weights = prunable(model)
        if self.update_at(self.step):
            self.masks = self.masks_for(self.weights, self.step)
            group = _group(self.weights[0])
            zeros = _count(self.masks, group, lambda m: (~m).sum())
            self.sparsity = zeros / _count(self.masks, group, lambda m: torch.tensor(m.numel()))
        if self.masks is not None:
            for w, m in zip(self.weights, self.masks, strict=True):
                local(w).mul_(m)

    def metrics(self) -> dict:
        return {"sparsity": self.sparsity}

    def state_dict(self) -> dict:
        return {"step": self.step, "sparsity": self.sparsity, "masked": self.masks is not None}

    @torch.no_grad()
    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """Continue the schedule at the saved step. The masks are not saved: the loaded weights are zero exactly
        where they were masked (masks apply after every step), so they are read back from them, on each rank's own
        shard -- whatever the new world size."""
        self.step, self.sparsity = state["step"], state["sparsity"]
        if state["masked"]:
            self.weights = prunable(model)
            self.masks = [local(w) != 0 for w in self.weights]
