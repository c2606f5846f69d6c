"""One optimizer step: forward_backward_step per micro-batch, then clip and step. No logging here."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from effitrain.base.converters import ModelConverter
from effitrain.base.flops import active_expert_share


@dataclass
class StepResult:
    """What a step leaves for the metrics, as device tensors: reading them back (a host sync) waits for the flush."""

    loss: torch.Tensor  # this rank's share of the step's loss: averaged over ranks, the global batch's mean
    grad_norm: torch.Tensor  # global norm before clipping
    finite: bool  # the global gradient norm was finite; when not, the update was not applied
    router: RouterLoad | None = None  # a mixture-of-experts model's routing over the step


@dataclass
class RouterLoad:
    """A mixture-of-experts model's routing over one step: tokens each expert of each layer received, and the
    router's auxiliary load-balancing loss (transformers' own, weighted by the config's router_aux_loss_coef)."""

    top_k: int
    coef: float
    counts: torch.Tensor | None = None  # [moe layers, experts], this rank's tokens
    aux: list[torch.Tensor] = field(default_factory=list)
    a2a: list = field(default_factory=list)  # expert parallelism's all-to-all byte counters (parallel/experts.py)

    @classmethod
    def of(cls, model: nn.Module) -> RouterLoad | None:
        """A RouterLoad for a mixture-of-experts model, None for a dense one."""
        config = getattr(getattr(model, "module", model), "config", None)  # DDP wraps the model
        if config is None or active_expert_share(config.get_text_config()) == 1.0:  # not a transformers model: dense
            return None
        from effitrain.parallel.experts import a2a_counters

        config, a2a = config.get_text_config(), a2a_counters(model)
        for counter in a2a:  # from here on: this step's bytes (an evaluation in between moved some too)
            counter.take()
        return cls(top_k=config.num_experts_per_tok, coef=float(getattr(config, "router_aux_loss_coef", 0.0)),
                   a2a=a2a)

    def add(self, router_logits: tuple[torch.Tensor, ...]) -> None:
        """Count the top-k experts each token of each layer was routed to."""
        with torch.no_grad():
            counts = torch.stack([F.one_hot(logits.float().topk(self.top_k, dim=-1).indices,
                                            logits.shape[-1]).sum(dim=(0, 1)) for logits in router_logits])
        self.counts = counts if self.counts is None else self.counts + counts

    def metrics(self) -> dict:
        """router_aux_loss (mean over micro-batches), expert_load (tokens per expert per layer, summed over ranks)
        and expert_load_cv (its coefficient of variation per layer: 0 = perfectly balanced); under expert parallelism
        a2a_bytes_per_rank, the bytes a rank sent to other ranks in the step's all-to-alls (forward and backward, from
        their split sizes; mean over ranks). Reads back and reduces across ranks: one small collective and host sync
        per step of a mixture-of-experts run."""
        import torch.distributed as dist

        # the bytes ride on the counts' all-reduce as one more column
        sent = sum(counter.take() for counter in self.a2a)
        counts = torch.cat([self.counts.double(), torch.full((len(self.counts), 1), float(sent),
                                                              dtype=torch.float64, device=self.counts.device)], 1)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(counts)
        counts, sent = counts[:, :-1], float(counts[0, -1]) / world
        cv = counts.std(dim=1, unbiased=False) / counts.mean(dim=1)
        return {"router_aux_loss": float(torch.stack(self.aux).mean()), "expert_load": counts.long().tolist(),
                "expert_load_cv": [round(float(c), 6) for c in cv],
                **({"a2a_bytes_per_rank": round(sent)} if self.a2a else {})}


def lm_loss(model: nn.Module, batch, converters: ModelConverter | None = None,
            router: RouterLoad | None = None) -> torch.Tensor:
    """Next-token cross entropy of a [B, T+1] window batch (inputs [:, :-1], targets [:, 1:]), or of a fine-tuning
    batch (data/sft.py: SftBatch) averaged over its trained labels, plus the loss terms the converters add
    (distillation, regularisers) and, given a RouterLoad, the router's auxiliary loss."""
    routed = {"output_router_logits": True} if router is not None else {}
    if isinstance(batch, torch.Tensor):
        out = model(input_ids=batch[:, :-1], **routed)
        logits = out.logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    else:
        # packed samples: positions restart per sample, and transformers masks attention between them from that --
        # only without a KV cache (it skips the detection when one exists, and config.use_cache makes one)
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **routed)
        logits = out.logits
        labels = batch.labels.flatten()
        # the sum over the trained labels / their count (at least 1: a batch of pads alone gives 0, not nan)
        loss = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100, reduction="sum") \
            / (labels != -100).sum().clamp(min=1)
    if router is not None:
        router.add(out.router_logits)
        router.aux.append(out.aux_loss.detach())
        loss = loss + router.coef * out.aux_loss
    extra = converters.loss_term(logits=logits, batch=batch, lm_loss=loss) if converters is not None else None
    return loss if extra is None else loss + extra


def forward_backward_step(model: nn.Module, batch, *, precision, weight: float | torch.Tensor,
                          converters: ModelConverter | None = None, router: RouterLoad | None = None
                          ) -> torch.Tensor:
    """Forward and backward of one micro-batch, its loss weighted by `weight` (micro_batch_weights); the weighted
    loss, detached."""
    with precision.autocast():
        loss = lm_loss(model, batch, converters, router)
    precision.backward(loss * weight)
    return loss.detach() * weight


def micro_batch_weights(micro_batches: list) -> list[float | torch.Tensor]:
    """What each micro-batch's mean loss weighs in the step's loss, so that the step trains on the mean over every
    token of the global batch. Text windows hold equal token counts: 1 / their number. Fine-tuning batches hold as
    many trained (answer) tokens as their samples have: count / the global batch's count, times the data-parallel
    world size that DDP's and FSDP's gradient averaging divides by again -- the mean over every answer token of
    every rank, as one process with the whole batch computes it (TRL and transformers' Trainer do the same with
    num_items_in_batch). One small all-reduce per fine-tuning step."""
    import torch.distributed as dist

    if isinstance(micro_batches[0], torch.Tensor):
        return [1.0 / len(micro_batches)] * len(micro_batches)
    counts = [b.labels.ne(-100).sum() for b in micro_batches]
    total = torch.stack(counts).sum().double()
    ranks = 1
    if dist.is_initialized() and dist.get_world_size() > 1:  # fine-tuning refuses tensor/pipeline parallel: DP = world
        dist.all_reduce(total)
        ranks = dist.get_world_size()
    total = total.clamp(min=1)  # a step of pads alone: loss 0, not nan
    return [(c.double() * ranks / total).float() for c in counts]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[torch.Tensor], *,
               precision, grad_clip: float, no_sync=None, converters: ModelConverter | None = None) -> StepResult:
    """Accumulate gradients over the micro-batches, clip the global norm, step (unless the scaler skips an overflow).

    Args:
        no_sync: optional context factory that skips gradient reduction on all but the last micro-step.
        converters: the run's model transforms (loss terms, post-optimizer hooks), or None.
    """
    losses, router = [], RouterLoad.of(model)
    for i, (batch, weight) in enumerate(zip(micro_batches, micro_batch_weights(micro_batches), strict=True)):
        last = i == len(micro_batches) - 1
        with nullcontext() if (last or no_sync is None) else no_sync():
            losses.append(forward_backward_step(model, batch, precision=precision, weight=weight,
                                                converters=converters, router=router))
    precision.unscale(optimizer)
    grad_norm = clip_grad_norm(model, grad_clip)
    # one host sync per step (fp16's scaler makes it anyway): a non-finite update would ruin the weights for good,
    # and the norm is global (the same on every rank), so every rank skips the same steps
    finite = bool(torch.isfinite(grad_norm))
    if finite or precision.scaler.is_enabled():  # fp16: the scaler skips an overflowed step itself and backs off
        precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    if converters is not None:
        converters.post_optimizer_hook(model)
    return StepResult(loss=torch.stack(losses).sum(), grad_norm=grad_norm, finite=finite, router=router)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the global norm (max_norm 0 = measure only); the norm spans all shards under FSDP/TP/EP."""
    params = [p for p in model.parameters() if p.grad is not None]
    if len({_mesh_of(p.grad) for p in params}) > 1:  # expert parallelism: DTensors of two meshes, or plain tensors
        return _clip_mixed(params, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2/TP: materialise the reduced value
        norm = norm.full_tensor()
    return norm


def _mesh_of(t: torch.Tensor):
    return getattr(t, "device_mesh", None)


def _clip_mixed(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global norm over gradients that torch's clip cannot stack together (plain tensors beside DTensors, or
    DTensors of different meshes: DDP's or FSDP's next to expert parallelism's), then the clip, one kind at a time.

    A plain gradient is the same on every rank (reduced by DDP), so it counts once; a DTensor's local shard has
    world/shards copies over the ranks (its mesh's Shard dims split it, the rest of the world holds replicas), so its
    squared norm counts that share of a sum over the world."""
    import torch.distributed as dist

    grads = [p.grad for p in params]
    world = dist.get_world_size()
    plain = sum((g.detach().float().pow(2).sum() for g in grads if _mesh_of(g) is None),
                torch.zeros((), device=grads[0].device))
    sharded = torch.zeros((), device=grads[0].device)
    for g in grads:
        if _mesh_of(g) is not None:
            shards = math.prod(n for placement, n in zip(g.placements, g.device_mesh.shape, strict=True)
                               if placement.is_shard())
            sharded = sharded + g.to_local().detach().float().pow(2).sum() * (shards / world)
    dist.all_reduce(sharded)
    norm = (plain + sharded).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # torch's clip_grads_with_norm_ rule
        for g in grads:  # a DTensor's own shard, in place: a plain factor does not meet a DTensor in one op
            (g.to_local() if _mesh_of(g) is not None else g).mul_(coef.to(g.dtype))
    return norm


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], *, precision, device: torch.device,
             loss=lm_loss) -> tuple[float, float]:
    """(validation loss, perplexity) over fixed batches; torchmetrics syncs the mean across ranks.

    Args:
        loss: (model, batch) -> the batch's mean loss (a pipeline's eval_loss runs its stages).
    """
    from torchmetrics.aggregation import MeanMetric

    mean = MeanMetric().to(device)
    was_training = model.training
    model.eval()
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        with precision.autocast():
            value = loss(model, batch)
        # a fine-tuning batch weighs its trained labels: the mean over every held-out answer token
        mean.update(value.float(), weight=batch.shape[0] if isinstance(batch, torch.Tensor) else batch.trained_tokens())
    model.train(was_training)
    val_loss = float(mean.compute())
    return val_loss, math.exp(min(val_loss, 50.0))
