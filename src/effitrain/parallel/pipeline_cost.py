"""Cost model of the pipeline layouts (parallel=pp, pp-fsdp) for `effitrain estimate`: each pipeline rank's memory,
the largest reported (the rank that runs out first).

A rank holds its stages' parameters (pipeline.split_model: split=even blocks per stage, the embedding with stage 0,
the final norm and head with the last stage; stage_ids places several stages per rank, looped or V-shaped), their
gradients and optimizer state; pp-fsdp shards those over the stage's dp_shard ranks as FSDP does elsewhere (Cost).

Activations follow the schedule's own action list: torch builds it (`_get_pipeline_order` of the one-stage
schedules, `pipeline_order` of the multi-stage ones) from nothing but the stage count, the ranks and the
microbatches, so the walk below replays exactly the order a run executes: a forward (F) adds one microbatch's saved
activations of that stage, a full backward (B) or a weight backward (W) frees them; an input backward (I) keeps
them (torch retains the graph for W). What torch.distributed.pipelining itself holds (stage.py, torch 2.13) is
counted too:

- each stage but the first keeps a receive buffer per microbatch for its input, and each stage but the last one per
  microbatch for the gradient of its output (allocated at the first step, kept); the input buffers' gradients stay
  as their .grad until the next step clears them;
- the last stage keeps every microbatch's logits (`output_chunks`, cleared when the next step starts) and, with
  effitrain's return_outputs left at its default, concatenates them once after the last backward (a second copy);
- under pp-fsdp every backward runs with gradient sync and resharding after backward off (the schedule reduces and
  reshards once, at the stage's last backward): from the stage's first backward its gradients accumulate unsharded
  (whole-stage, fp32), and its parameters stay gathered from a backward's end until the stage's next forward
  reshards them (reshard_after_forward), so 1f1b's alternation holds them for less of the step than gpipe's run of
  backwards;
  the stage's last backward reduce-scatters a flat copy of those gradients (with several stages per rank, while the
  others still hold theirs), after which its gradient shards remain.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

from effitrain.errors import UsageError
from effitrain.parallel import SCHEDULES, Degrees

FP32 = 4  # pipelines run fp32 only (parallel._check_pipeline_options)


@dataclass(frozen=True)
class Stage:
    """One stage as the memory model sees it: its blocks, whether it holds the embedding / the head."""

    index: int
    layers: range
    first: bool
    last: bool


def rank_stages(rank: int, *, pp: int, per_rank: int, schedule: str, num_layers: int, split: str = "even",
                costs: list[int] | None = None) -> list[Stage]:
    """The stages `rank` holds, with their blocks (pipeline.stage_ids and layer_ranges: the split the run makes;
    split=cost weighs the blocks by `costs`, shape_costs)."""
    from effitrain.parallel.pipeline import layer_ranges, stage_ids

    count = pp * per_rank
    ranges = layer_ranges(num_layers, count, split=split, costs=costs)
    return [Stage(i, ranges[i], first=i == 0, last=i == count - 1)
            for i in stage_ids(rank, pp=pp, per_rank=per_rank, style=SCHEDULES[schedule].style)]


def shape_costs(s) -> list[int]:
    """pipeline.block_costs of a model shape (estimate.Shape): its blocks' weights and its head's."""
    from effitrain.parallel.pipeline import block_costs

    weights = [0] * s.layers
    for p in s.params:
        if p.block is not None:
            weights[p.block] += p.numel
    return block_costs(weights, head_weights=sum(p.numel for p in s.params if p.kind == "head"))


def holds(p, stages: list[Stage]) -> bool:
    """Whether a rank holding `stages` keeps parameter `p`: its blocks' parameters, the embedding with the first
    stage, the final norm and head with the last (pipeline._keep)."""
    block = p.block
    if block is not None:
        return any(block in st.layers for st in stages)
    if p.kind == "embedding":
        return any(st.first for st in stages)
    return any(st.last for st in stages)  # final norm, head


def schedule_actions(schedule: str, *, pp: int, per_rank: int, microbatches: int) -> dict[int, list[tuple]]:
    """Per pipeline rank, its compute actions in order as (kind, stage), kind F / B / I / W: torch's own action
    list. The schedule is built on stand-ins for its stages, carrying only what its constructor reads (the stage
    count, the ranks, a module): no process group, no model."""
    import torch
    from torch.distributed.pipelining import schedules

    spec = SCHEDULES[schedule]
    count = pp * per_rank

    def stand_in(rank: int, index: int) -> SimpleNamespace:
        return SimpleNamespace(num_stages=count, group_size=pp, group_rank=rank, stage_index=index,
                               is_first=index == 0, is_last=index == count - 1, submod=torch.nn.Identity())

    cls = getattr(schedules, spec.cls)
    if issubclass(cls, schedules.PipelineScheduleSingle):
        order = cls(stand_in(0, 0), n_microbatches=microbatches)._get_pipeline_order()
    else:
        ids = [s.index for s in rank_stages(0, pp=pp, per_rank=per_rank, schedule=schedule, num_layers=count)]
        order = cls([stand_in(0, i) for i in ids], n_microbatches=microbatches).pipeline_order
    return {rank: [(a.computation_type.value, a.stage_index) for action in actions if action is not None
                   for a in (action.sub_actions or (action,)) if a.computation_type.value in "FBIW"]
            for rank, actions in order.items()}


@dataclass(frozen=True)
class StageBytes:
    """One stage's bytes for one microbatch: what its forward saves, what its backward adds at its start (the loss's
    buffers and the head's weight gradient on the last stage) and still holds at its end (the stage's first block's
    saved tensors), the logits the last stage keeps, the gradient of the stage's input it leaves."""

    saved: int
    backward: int
    tail: int
    logits: int
    hidden: int
    first_grads: int = 0  # gradients a backward makes before any activation is freed (the head's weight)


@dataclass(frozen=True)
class Gathers:
    """pp-fsdp's gathered parameters per stage (bytes): what a forward gathers (the stage's root and two blocks), and
    the whole stage, which stays gathered from a backward's end (the schedule turns resharding after backward off)
    until a forward reshards it (reshard_after_forward) or the stage's last backward reduces its gradients and
    reshards it (then its gradient shards, `reduced`, remain). Empty under pp."""

    forward: dict[int, int]
    whole: dict[int, int]
    reshard_after_forward: bool = True
    reduced: dict[int, int] | None = None  # each stage's gradients once reduce-scattered: its shards


def walk(actions: list[tuple], stages: dict[int, StageBytes], *, grads: dict[int, int], gathers: Gathers | None = None
         ) -> tuple[int, int, int, int]:
    """Replay one rank's actions: (the largest bytes at any moment, beside model states and buffers; the largest
    saved activations; the logits kept at the end; the input gradients kept at the end).

    A forward adds its saved tensors (and the last stage's logits, kept to the end of the step). A backward starts
    with everything saved, its transient, and the gradients of the stages whose backward ran before (`grads`; else
    only the head's weight gradient): a stage's gradients appear during its first backward while the microbatch's
    activations are freed, so its end holds them all beside the stage's first block's saved tensors, and the
    gradient of its input (the receive buffer's .grad, kept to the next step) on every stage but the first. An
    input backward (I) frees nothing: torch keeps its graph for the weight backward (W)."""
    in_flight = {s: 0 for s in stages}
    logits = input_grads = peak = most_saved = 0
    done: set[int] = set()  # stages whose gradients exist
    held: set[int] = set()  # pp-fsdp: stages whose parameters stay gathered
    g = gathers or Gathers({}, {})

    def now(extra: int = 0) -> int:
        saved = sum(in_flight[s] * stages[s].saved for s in stages)
        return (saved + logits + input_grads + sum(grads[s] for s in done) + sum(g.whole[s] for s in held)
                + sum(g.reduced[s] for s in reduced) + extra)

    last = {s: i for i, (kind, s) in enumerate(actions) if kind in ("B", "W")}
    reduced: set[int] = set()  # pp-fsdp: stages whose last backward reduce-scattered their gradients
    for i, (kind, s) in enumerate(actions):
        b = stages[s]
        if kind == "F":
            in_flight[s] += 1
            logits += b.logits
            peak = max(peak, now(0 if s in held else g.forward.get(s, 0)))
            most_saved = max(most_saved, sum(in_flight[t] * stages[t].saved for t in stages))
            if g.reshard_after_forward:
                held.discard(s)
        if kind in ("B", "I"):
            peak = max(peak, now(b.backward + (0 if s in done else b.first_grads)))
            input_grads += b.hidden
        if kind in ("B", "W"):
            in_flight[s] -= 1
            done.add(s)
            if g.whole:
                held.add(s)
            peak = max(peak, now(b.tail))
            if g.reduced is not None and i == last[s]:
                # the stage's last backward: FSDP reduce-scatters a flat copy of its unsharded gradients, then keeps
                # the shards and reshards the parameters -- while this rank's other stages may still hold theirs
                peak = max(peak, now(grads[s]))
                done.discard(s)
                held.discard(s)
                reduced.add(s)
    return peak, most_saved, logits, input_grads


class PipelineCost:
    """The pipeline layouts' memory on their worst rank (module docstring); pp-fsdp's sharding inside a stage is
    FSDP's.

    Args:
        node: the `parallel` node.
        inner: the layout's cost model without the pipeline (build.Cost: how FSDP shards a parameter).
    """

    def __init__(self, node, *, inner):
        self.node = node
        self.inner = inner

    @property
    def shards(self) -> bool:
        return self.inner.shards

    def local_numel(self, p, d: Degrees) -> int:
        return self.inner.local_numel(p, d)

    def ranks(self, s, *, cfg, d: Degrees, per_layer: int, head_input: int,
              optimizer: Callable[[list, list], tuple[int, int]]) -> list[dict]:
        """Every pipeline rank's memory items and moments (bytes), as estimate.py reports them.

        Args:
            s: the model's shape (estimate.Shape).
            cfg: the composed config (batch, sequence, microbatches, schedule).
            d: the layout's degrees.
            per_layer: bytes one block saves per token (the family's cost model, fp32).
            head_input: bytes the final norm and the head save per token.
            optimizer: (trained parameters, their local numels) -> (optimizer state bytes, the update's temporaries).
        """
        return [self.rank_memory(s, rank, cfg=cfg, d=d, per_layer=per_layer, head_input=head_input,
                                 optimizer=optimizer) for rank in range(d.pp)]

    def rank_memory(self, s, rank: int, *, cfg, d: Degrees, per_layer: int, head_input: int,
                    optimizer: Callable[[list, list], tuple[int, int]]) -> dict:
        """One pipeline rank: {"memory": items, "moments": moments} (ranks' Args)."""
        if s.compression:
            raise UsageError(f"effitrain estimate models parallel={self.node.name} without compression methods")
        node, m = self.node, self.node.microbatches
        stages = rank_stages(rank, pp=d.pp, per_rank=node.stages_per_rank, schedule=node.schedule,
                             num_layers=s.layers, split=node.split, costs=shape_costs(s))
        mine = [p for p in s.params if holds(p, stages)]
        local = [self.local_numel(p, d) for p in mine]
        trained = [(p, n) for p, n in zip(mine, local, strict=True) if p.trainable]
        n_trained = sum(n for _, n in trained)
        state, temporaries = optimizer([p for p, _ in trained], [n for _, n in trained])
        mem = {"parameters": sum(local) * FP32, "gradients": n_trained * FP32, "optimizer_state": state}
        head_grad = sum(p.numel for p in mine if p.kind == "head" and p.trainable) * FP32
        # a batch the microbatches do not divide is refused before launch; --max-batch tries any: round it up
        per_stage = _stage_bytes(s, stages, per_layer=per_layer, head_input=head_input,
                                 tokens=-(-cfg.batch_size // m) * cfg.data.seq_len, head_grad=head_grad)
        # once a stage's backward ran: its fp32 gradients, whole (under pp-fsdp unsharded: the schedule turns gradient
        # sync off until its last action)
        own = {st.index: [p for p in mine if holds(p, [st])] for st in stages}  # each stage's parameters
        grads = {i: sum(p.numel for p in ps if p.trainable) * FP32 for i, ps in own.items()}
        actions = schedule_actions(node.schedule, pp=d.pp, per_rank=node.stages_per_rank, microbatches=m)[rank]
        # receive buffers, one per microbatch: activations into each stage but the first, gradients into each but
        # the last
        hidden = cfg.batch_size * cfg.data.seq_len * s.hidden * FP32
        mem["pipeline_buffers"] = sum((not st.first) + (not st.last) for st in stages) * hidden
        gathers = None
        if self.shards:
            gathers = Gathers(forward={i: _forward_gather(ps) for i, ps in own.items()},
                              whole={i: sum(p.numel for p in ps) * FP32 for i, ps in own.items()},
                              reshard_after_forward=node.reshard_after_forward,
                              reduced={i: sum(self.local_numel(p, d) for p in ps if p.trainable) * FP32
                                       for i, ps in own.items()})
            mem["fsdp_gathered_params"] = sum(gathers.whole.values())
        peak, saved, logits, input_grads = walk(actions, per_stage, grads=grads, gathers=gathers)
        mem["activations"] = saved  # the most microbatches' saved tensors at once, by the schedule
        mem["stage_outputs"] = logits  # the last stage's logits, kept to the end of the step
        mem["input_grads"] = input_grads
        mem["optimizer_temporaries"] = temporaries
        static = mem["parameters"] + mem["optimizer_state"] + mem["pipeline_buffers"]
        moments = {"forward/backward": static + peak,
                   "optimizer step": static + mem["gradients"] + temporaries + logits + input_grads}
        if logits:  # after the last backward the schedule concatenates the kept logits (then drops the copy)
            moments["merging outputs"] = static + mem["gradients"] + 2 * logits + input_grads
        return {"memory": mem, "moments": moments}


def _stage_bytes(s, stages: list[Stage], *, per_layer: int, head_input: int, tokens: int, head_grad: int
                 ) -> dict[int, StageBytes]:
    """Each stage's StageBytes for one microbatch of `tokens`; head_grad: the head weight's gradient bytes."""
    hidden, vocab = s.hidden * FP32, s.vocab * FP32
    out = {}
    for st in stages:
        # a stage's first block saves its input: on every stage but the first that is the receive buffer (counted
        # once, in pipeline_buffers); every stage but the last keeps its output for backward
        saved = len(st.layers) * per_layer - (0 if st.first else hidden) + (0 if st.last else hidden)
        if st.last:  # final norm and head inputs, and the log-softmax cross entropy saves
            saved += head_input + vocab
        # the loss's backward: the log-softmax's gradient and the logits' gradient, beside what it saved
        backward = 2 * vocab if st.last else 0
        out[st.index] = StageBytes(saved=saved * tokens, backward=backward * tokens, tail=per_layer * tokens,
                                   logits=vocab * tokens if st.last else 0, hidden=0 if st.first else hidden * tokens,
                                   first_grads=head_grad if st.last else 0)
    return out


def _forward_gather(mine: list) -> int:
    """pp-fsdp's gathered parameters in a forward before any backward: the stage's root parameters and two blocks
    (one computing, one prefetched)."""
    blocks: dict[int, int] = {}
    root = 0
    for p in mine:
        if p.block is None:
            root += p.numel
        else:
            blocks[p.block] = blocks.get(p.block, 0) + p.numel
    return (root + sum(sorted(blocks.values())[-2:])) * FP32
