"""Pipeline parallel (parallel=pp, pp-fsdp): the model's blocks split into stages over the pipeline ranks, run by a
torch.distributed.pipelining schedule.

Each rank builds the whole model on the meta device, then keeps only its own stages' parts (torchtitan's way):
the blocks of other stages become parameterless pass-throughs, the embedding goes where stage 0 is not, the final
norm and the head where the last stage is not. Which modules those are, the family's transformers config says: its
base_model_pp_plan names the embedding, the blocks and the final norm in order (llama, qwen3, mistral: effitrain's
own llama models and model.pretrained checkpoints alike). Only then are the kept parameters materialised: filled by
the seeded init, or read from a model.pretrained checkpoint's safetensors tensor by tensor (model/load.py's
SlicedLoad), so a rank never holds another stage's weights. Parameter names stay those of the whole model, so a
checkpoint (DCP) holds every rank's stages under the whole model's names and loads back at another layout (pp 2 ->
single).
A stage's forward is the family's own transformers forward (masks, positions, rotary tables computed alike on every
stage): stage 0 takes token ids, the others the hidden states the previous stage sent.

The loss lives on the last stage (the schedule's loss_fn). It is scaled by 1 / (microbatches x grad_accum_steps), so
the gradients add up to single's mean over the batch; the reported loss is the last stage's, summed to every rank
of the pipeline; the gradient norm is the global one (squared norms summed over the stages).
"""

from __future__ import annotations

import copy
import itertools
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from effitrain.parallel import SCHEDULES


def stage_ids(rank: int, *, pp: int, per_rank: int, style: str) -> list[int]:
    """The pipeline stages `rank` holds: loop style s, s + pp, ...; V style r and 2 pp - 1 - r."""
    if style == "v":
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(per_rank)]


def layer_ranges(num_layers: int, stages: int, *, split: str = "even", costs: list[int] | None = None
                 ) -> list[range]:
    """Contiguous blocks per stage. split=even: as equal in number as they divide (the first stages take one more);
    split=cost: as equal in cost (`costs`, block_costs: the largest stage's the least it can be)."""
    if split == "cost":
        return _balanced_ranges(costs, stages)
    sizes = [num_layers // stages + (1 if s < num_layers % stages else 0) for s in range(stages)]
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def block_costs(block_weights: list[int], *, head_weights: int) -> list[int]:
    """split=cost's cost of each block: its training FLOPs per token from its weights (6 x weights, as base/flops.py
    counts them; the attention scores' FLOPs, the same for every full-attention block, left out), the head's
    (6 x vocab x hidden) added to the last block -- the stage holding it holds the head. The input embedding is a
    lookup: no matmul FLOPs, it adds nothing."""
    costs = [6 * n for n in block_weights]
    costs[-1] += 6 * head_weights
    return costs


def _balanced_ranges(costs: list[int], stages: int) -> list[range]:
    """The contiguous split of `costs` into `stages` non-empty ranges whose largest sum is the least; among those,
    the most even (the least sum of squares)."""
    prefix = list(itertools.accumulate(costs, initial=0))
    bound, _ = _best_split(prefix, stages, lambda acc, r: max(acc, r))
    return _best_split(prefix, stages, lambda acc, r: acc + r * r if r <= bound else math.inf)[1]


def _best_split(prefix: list[int], stages: int, add) -> tuple[float, list[range]]:
    """Dynamic programming over the prefix sums: the least score of a split into `stages` ranges, scored range by
    range with add(score so far, the range's sum), and that split (on ties the earlier stages lighter)."""
    n = len(prefix) - 1
    best = {(0, 0): (0, 0)}  # (ranges, blocks covered) -> (score, where the last range starts)
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            best[k, i] = min((add(best[k - 1, j][0], prefix[i] - prefix[j]), j) for j in range(k - 1, i)
                             if (k - 1, j) in best)
    ends = [n]
    for k in range(stages, 0, -1):
        ends.append(best[k, ends[-1]][1])
    ends.reverse()
    return best[stages, n][0], [range(a, b) for a, b in itertools.pairwise(ends)]


def stage_parts(model: nn.Module) -> tuple[str, str, str]:
    """The base model's embedding, blocks (a ModuleList) and final norm, by attribute name: the three entries, in
    order, of the family's transformers base_model_pp_plan (model.pp_plan_gap refuses other shapes before launch)."""
    embedding, blocks, norm = model.config.base_model_pp_plan
    return embedding, blocks, norm


def _blocks(model: nn.Module) -> nn.ModuleList:
    return getattr(model.base_model, stage_parts(model)[1])


class _Skip(nn.Module):
    """A block another stage owns: hidden states pass through (no parameters, the block's index kept)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _stage_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A stage's forward: token ids (stage 0) or hidden states in, the family's forward through the blocks this
    module keeps, the last stage's logits or another's hidden states out -- a plain tensor, as pipelining sends it.
    (Not the causal LM's forward without a head: its output would be a slice, a view, which the zero-bubble
    schedules' split backward cannot detach in place.)"""
    key = "inputs_embeds" if x.is_floating_point() else "input_ids"
    if self.lm_head is None:
        return self.base_model(**{key: x}).last_hidden_state
    return self._hf_forward(**{key: x}).logits


def _as_stage(model: nn.Module) -> None:
    """Give the model a stage's forward (a subclass of its own class, as FSDP's fully_shard does)."""
    cls = type(model)
    model.__class__ = type(f"Stage{cls.__name__}", (cls,), {"forward": _stage_forward, "_hf_forward": cls.forward})


def _keep(model: nn.Module, *, layers: set[int], first: bool, last: bool) -> None:
    """Drop in place what the stages holding `layers` do not own (first: the embedding; last: norm and head)."""
    inner, blocks = model.base_model, _blocks(model)
    embedding, _, norm = stage_parts(model)
    for i in range(len(blocks)):
        if i not in layers:
            blocks[i] = _Skip()
    if not first:
        setattr(inner, embedding, None)  # never called: the stage takes inputs_embeds
    if not last:
        setattr(inner, norm, nn.Identity())
        model.lm_head = None


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy sharing the module's parameters, buffers and children, with a children dict and hook dicts of its own:
    a child swapped or a hook registered on one copy (FSDP2's, when each stage is its own FSDP root) stays there."""
    twin = copy.copy(module)
    for key, value in vars(module).items():
        if key == "_modules" or ("hooks" in key and isinstance(value, dict)):
            object.__setattr__(twin, key, copy.copy(value))
    return twin


def _view(model: nn.Module, *, layers: set[int], first: bool, last: bool) -> nn.Module:
    """One stage of a rank that holds several (interleaved, V): a shallow copy of the rank's model sharing its
    blocks, embedding, norm and head (so the optimizer and the checkpoint see each parameter once)."""
    inner = _shallow_copy(model.base_model)
    setattr(inner, stage_parts(model)[1], nn.ModuleList(list(_blocks(model))))
    view = _shallow_copy(model)
    setattr(view, model.base_model_prefix, inner)
    _keep(view, layers=layers, first=first, last=last)
    return view


@dataclass(frozen=True)
class Plan:
    """Where this rank stands in the pipeline."""

    rank: int  # in the pipeline group
    pp: int
    stages: int  # pp x stages_per_rank
    ids: list[int]  # the stages this rank holds
    ranges: list[range]  # blocks of every stage
    style: str  # loop or v (parallel.SCHEDULES)

    @classmethod
    def of(cls, cfg, *, rank: int, pp: int, costs: list[int]) -> Plan:
        """cfg: the `parallel` group; costs: block_costs of the model's blocks (split=cost weighs them)."""
        stages = pp * cfg.stages_per_rank
        style = SCHEDULES[cfg.schedule].style
        ids = stage_ids(rank, pp=pp, per_rank=cfg.stages_per_rank, style=style)
        ranges = layer_ranges(len(costs), stages, split=cfg.split, costs=costs)
        return cls(rank=rank, pp=pp, stages=stages, ids=ids, ranges=ranges, style=style)

    def owner(self, stage: int) -> int:
        """The pipeline rank holding `stage` (the inverse of stage_ids)."""
        return next(r for r in range(self.pp) if stage in stage_ids(r, pp=self.pp, per_rank=len(self.ids),
                                                                      style=self.style))

    def describe(self) -> str:
        """One line for the run's log: each stage's blocks, in stage order."""
        blocks = " | ".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else f"{r.start}" for r in self.ranges)
        return f"pipeline: {self.stages} stages over {self.pp} ranks, blocks per stage {blocks}"

    def layers(self, ids: list[int]) -> set[int]:
        return {i for s in ids for i in self.ranges[s]}

    @property
    def first(self) -> bool:
        return 0 in self.ids

    @property
    def last(self) -> bool:
        return self.stages - 1 in self.ids


def _plan(model: nn.Module, cfg, mesh) -> Plan:
    """This rank's Plan for the whole model (before the split drops other stages' parts)."""
    pp, head = mesh["pp"], model.get_output_embeddings()
    costs = block_costs([sum(p.numel() for p in block.parameters()) for block in _blocks(model)],
                        head_weights=head.weight.numel())
    return Plan.of(cfg, rank=pp.get_local_rank(), pp=pp.size(), costs=costs)


def split_model(model: nn.Module, *, cfg, mesh) -> list[nn.Module]:
    """Cut `model` (still on meta) to this rank's part -- its stages' blocks, embedding / norm / head where it holds
    the first / last stage, with a stage's forward -- and return the module of each of its stages: the model itself
    when it holds one, else a view per stage sharing the model's parts (what FSDP wraps and the schedule runs).

    Args:
        model: the causal LM, built on the meta device.
        cfg: the `parallel` config group (schedule, stages_per_rank, split).
        mesh: the layout's device mesh (its "pp" dimension).
    """
    plan = _plan(model, cfg, mesh)
    _keep(model, layers=plan.layers(plan.ids), first=plan.first, last=plan.last)
    _as_stage(model)
    stages = [model] if len(plan.ids) == 1 else [
        _view(model, layers=plan.layers([s]), first=s == 0, last=s == plan.stages - 1) for s in plan.ids]
    model.pipeline_plan, model.pipeline_stages = plan, stages  # for build_pipeline (stages: not submodules)
    return stages


def _timed_stage_class():
    """PipelineStage that adds up the time its own computation takes (forward, backward, weight-gradient chunks):
    the rest of a schedule's step on this rank is waiting on the other stages -- the bubble. On CUDA each chunk is
    synchronised for the measurement (it then also waits for the communication it overlaps)."""
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):
        busy_s = 0.0

        def _timed(self, fn, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.busy_s += time.perf_counter() - t0
            return out

        def forward_one_chunk(self, *args, **kwargs):
            return self._timed(super().forward_one_chunk, *args, **kwargs)

        def backward_one_chunk(self, *args, **kwargs):
            return self._timed(super().backward_one_chunk, *args, **kwargs)

        def backward_weight_one_chunk(self, *args, **kwargs):
            return self._timed(super().backward_weight_one_chunk, *args, **kwargs)

    return TimedStage


def _scaled_loss(logits: torch.Tensor, targets: torch.Tensor, *, scale: int) -> torch.Tensor:
    """Next-token cross entropy of one microbatch over `scale` = microbatches x grad_accum_steps: the gradients the
    schedule accumulates are single's mean over the batch (the schedule does not rescale them: scale_grads=False)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) / scale


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them; `train_step` and `eval_loss` stand in for engine.loop's.

    Args:
        schedule: the torch.distributed.pipelining schedule.
        stages: this rank's PipelineStages (TimedStage).
        plan: where this rank stands.
        group: the pipeline's process group (ranks holding the other stages of this data-parallel replica).
        microbatches: per micro-step.
        accum: grad_accum_steps (each micro-step is one schedule step).
        theory_pct: the schedule's theoretical bubble (p - 1) / (m + p - 1) (gpipe, 1f1b), else None.
    """

    schedule: object
    stages: list
    plan: Plan
    group: object
    microbatches: int
    accum: int
    theory_pct: float | None
    last_metrics: dict = field(default_factory=dict)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        """One schedule step (forward and backward) over a [B, T+1] window batch; the sum of the last stage's scaled
        microbatch losses (0 on the other ranks)."""
        losses = [] if self.plan.last else None
        target = batch[:, 1:] if self.plan.last else None
        args = (batch[:, :-1],) if self.plan.first else ()
        self.schedule.step(*args, target=target, losses=losses)
        return torch.stack(losses).sum().detach() if losses else torch.zeros((), device=batch.device)

    def train_step(self, model: nn.Module, optimizer, micro_batches: list[torch.Tensor], *, precision,
                   grad_clip: float, no_sync=None, converters=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """engine.loop.train_step under the pipeline: one schedule step per micro-step (gradients accumulate), the
        loss and the squared gradient norm summed over the pipeline's ranks in one all-reduce, clip, step; (loss,
        global grad norm, finite) -- the fields of engine.loop.StepResult."""
        for stage in self.stages:
            stage.busy_s = 0.0
        t0 = time.perf_counter()
        loss = sum(self._run(batch) for batch in micro_batches)
        wall = time.perf_counter() - t0
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # pp-fsdp: a DTensor over the stage's shards
            norm = norm.full_tensor()
        stats = self._sum([loss.double(), norm.double() ** 2, wall], device=norm.device,
                          busy=sum(s.busy_s for s in self.stages))
        total = stats[1].sqrt().float()
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total, foreach=True)
        finite = bool(torch.isfinite(total))
        if finite:
            precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        pp = self.plan.pp
        self._record(wall=float(stats[2]), mem=stats[3:3 + pp], busy=stats[3 + pp:])
        return stats[0].float(), total, finite

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """engine.loop.lm_loss under the pipeline: the batch's mean loss on every rank. The whole batch goes through
        the stages in order, each sending its hidden states to the next stage's rank (no schedule: torch's eval of
        the V schedules asks for backward state, and a forward pass needs no microbatches)."""
        import torch.distributed as dist

        plan, modules = self.plan, {stage.stage_index: stage.submod for stage in self.stages}
        shape = (batch.shape[0], batch.shape[1] - 1, model.config.hidden_size)
        h = batch[:, :-1]
        for s in range(plan.stages):
            owner, prev = plan.owner(s), plan.owner(s - 1) if s else None  # stage 0 takes the batch itself
            if owner == plan.rank:
                if prev not in (None, plan.rank):
                    h = torch.empty(shape, device=batch.device)
                    dist.recv(h, src=dist.get_global_rank(self.group, prev), group=self.group)
                h = modules[s](h)
            elif prev == plan.rank:
                dist.send(h.contiguous(), dst=dist.get_global_rank(self.group, owner), group=self.group)
        loss = F.cross_entropy(h.flatten(0, 1), batch[:, 1:].flatten()) if plan.last else torch.zeros(())
        return self._sum([loss.double()], device=batch.device)[0].float()

    def _sum(self, values: list, *, device, busy: float = 0.0) -> torch.Tensor:
        """values, then this rank's peak memory and `busy` (its stages' compute seconds) each in its slot of pp,
        summed over the pipeline's ranks (one all-reduce)."""
        import torch.distributed as dist

        mem, computed = [0.0] * self.plan.pp, [0.0] * self.plan.pp
        mem[self.plan.rank], computed[self.plan.rank] = _peak_memory_gib(device), busy
        stats = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                             for v in values + mem + computed])
        if self.plan.pp > 1:
            dist.all_reduce(stats, group=self.group)
        return stats

    def _record(self, *, wall: float, mem: torch.Tensor, busy: torch.Tensor) -> None:
        """bubble_pct: the share of the step's time the pipeline's ranks waited (1 - computing / wall time, summed
        over the ranks; `wall` is the ranks' summed wall time); bubble_theory_pct: the schedule's own;
        stage_mem_peak_gib: peak memory by pipeline rank; stage_busy_ms: each pipeline rank's compute time in the
        step (its stages' forward and backward chunks: what a split balances)."""
        total = float(busy.sum())
        self.last_metrics = {"bubble_pct": round(100.0 * (1.0 - total / wall), 3) if wall > 0 else None,
                             "stage_mem_peak_gib": [round(float(m), 4) for m in mem],
                             "stage_busy_ms": [round(1000.0 * float(b), 3) for b in busy]}
        if self.theory_pct is not None:
            self.last_metrics["bubble_theory_pct"] = round(self.theory_pct, 3)


def _peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory: CUDA's allocated peak, or on the CPU the peak RSS (Linux: KiB, macOS: bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def build_pipeline(model: nn.Module, *, cfg, job, grad_accum_steps: int) -> Pipeline:
    """The schedule over this rank's stages of `model` (a rank's model from the pp / pp-fsdp builder).

    Args:
        model: this rank's part of the model, materialised.
        cfg: the `parallel` config group (schedule, microbatches, stages_per_rank).
        job: the process's Job (its mesh's "pp" dimension).
        grad_accum_steps: micro-steps per optimizer step (each runs the schedule once).
    """
    from torch.distributed.pipelining import schedules

    plan, modules = model.pipeline_plan, model.pipeline_stages
    group = job.mesh["pp"].get_group()
    stage_cls = _timed_stage_class()
    stages = [stage_cls(m, s, plan.stages, job.world.device, group=group) for m, s in zip(modules, plan.ids,
                                                                                           strict=True)]
    cls = getattr(schedules, SCHEDULES[cfg.schedule].cls)
    single = issubclass(cls, schedules.PipelineScheduleSingle)
    m = cfg.microbatches
    schedule = cls(stages[0] if single else stages, n_microbatches=m,
                   loss_fn=partial(_scaled_loss, scale=m * grad_accum_steps), scale_grads=False)
    return Pipeline(schedule=schedule, stages=stages, plan=plan, group=group, microbatches=m, accum=grad_accum_steps,
                    theory_pct=bubble_theory_pct(cfg.schedule, pp=plan.pp, microbatches=m))


def bubble_theory_pct(schedule: str, *, pp: int, microbatches: int) -> float | None:
    """The schedule's theoretical bubble (p - 1) / (m + p - 1), for gpipe and 1f1b (the benchmarks' column)."""
    if schedule not in ("gpipe", "1f1b"):
        return None
    return 100.0 * (pp - 1) / (microbatches + pp - 1)

