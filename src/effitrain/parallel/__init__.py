"""The `parallel` group: single, ddp, fsdp (ZeRO-3 / ZeRO-2), hsdp, tp, fsdp-tp, pp, pp-fsdp and pp-fsdp-tp
layouts, with activation checkpointing and regional compile; expert parallelism (`parallel.ep`) for mixture-of-experts
models under ddp/fsdp.

Schemas, parallel degrees and checks here (no torch); builders in `effitrain.parallel.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.errors import UsageError
from effitrain.model import (
    TP_PLAN,
    attention_heads,
    ep_plan_gap,
    num_experts,
    num_layers,
    pp_plan_gap,
    tied_embeddings,
    tp_plan_gap,
)
from effitrain.registry import Group, Need

GROUP = Group("parallel", key="strategy", builders="effitrain.parallel.build")

# Traits a layout provides to the other chosen options (registry.Group.traits):
WHOLE_WEIGHTS = "whole_weights"  # every rank holds whole weight matrices
DDP = "ddp"  # DDP: the default process group's ranks each hold a replica; gradients all-reduced in buckets
COMM_HOOKS = "ddp_comm_hooks"  # a DDP communication hook compresses the gradients' all-reduce
CONVERTED_MODULES = "converted_modules"  # wraps modules a converter replaced or added (adapters, fake-quantized
# Linears, masked weights, a teacher placed alike): whole weights, or FSDP's 1-D dim-0 shards
SHARDS_PARAMS = "shards_params"  # FSDP2 shards parameters, gradients and optimizer state over dp_shard ranks
FSDP_REDUCE = "fsdp_reduce"  # gradients reduce-scattered in precision.reduce_dtype (FSDP's MixedPrecisionPolicy)
TENSOR_PARALLEL = "tensor_parallel"  # Megatron TP over parallel.tp ranks
EXPERT_PARALLEL = "expert_parallel"  # parallel.ep > 1: each rank holds 1/ep of every MoE layer's experts (DTensors)
PIPELINE = "pipeline"  # the model's layers split into stages over parallel.pp ranks (parallel/pipeline.py)



@dataclass
class ParallelBase:
    name: str = "single"
    strategy: str = "single"
    activation_checkpointing: str = "none"  # none | full | selective
    ac_every: int = 2  # selective: checkpoint every k-th block
    compile: bool = False  # torch.compile each transformer block


@GROUP.option("single")
@dataclass
class SingleParallel(ParallelBase):
    strategy: str = "single"


@GROUP.option("ddp")
@dataclass
class DDPParallel(ParallelBase):
    strategy: str = "ddp"
    ep: int = 1  # expert-parallel degree (MoE models): experts sharded over ep ranks, tokens sent by all-to-all


@dataclass
class ShardedBase(ParallelBase):
    reshard_after_forward: bool = True  # ZeRO-3 (True) or ZeRO-2 (False)
    offload: Optional[str] = None  # cpu = keep parameters, gradients and optimizer state on the host
    dp_shard: int = -1  # FSDP shard degree; -1 = whatever the world size leaves


@GROUP.option("fsdp")
@dataclass
class FSDPParallel(ShardedBase):
    strategy: str = "fsdp"
    ep: int = 1  # expert-parallel degree (MoE models): experts sharded over ep ranks, FSDP shards the rest


@GROUP.option("hsdp")
@dataclass
class HSDPParallel(ShardedBase):
    strategy: str = "hsdp"
    dp_replicate: int = 2  # replicas; dp_replicate x dp_shard = world size


@GROUP.option("tp")
@dataclass
class TPParallel(ParallelBase):
    strategy: str = "tp"
    tp: int = -1  # tensor-parallel degree; -1 = every rank
    sequence_parallel: bool = False


@GROUP.option("fsdp-tp")
@dataclass
class FSDPTPParallel(ShardedBase):
    strategy: str = "fsdp-tp"
    tp: int = 2
    sequence_parallel: bool = False


@dataclass
class PipelineKeys:
    """The keys of the pipeline layouts (parallel/pipeline.py builds them)."""

    pp: int = -1  # pipeline stages' ranks; -1 = every rank (pp) or world size / dp_shard (pp-fsdp: set one of them)
    schedule: str = "1f1b"  # one of SCHEDULES
    microbatches: int = 4  # per micro-step: batch_size is split into this many pipeline microbatches
    stages_per_rank: int = 1  # interleaved / V schedules: stages each rank holds (virtual stages)
    split: str = "even"  # even: the same number of blocks per stage (the first stages one more); cost: the same
    # training FLOPs per stage as near as contiguous blocks allow (the head weighs in: pipeline.block_costs)


@GROUP.option("pp")
@dataclass
class PPParallel(PipelineKeys, ParallelBase):
    strategy: str = "pp"


@GROUP.option("pp-fsdp")
@dataclass
class PPFSDPParallel(PipelineKeys, ShardedBase):
    strategy: str = "pp-fsdp"
    pp: int = 2


@GROUP.option("pp-fsdp-tp")
@dataclass
class PPFSDPTPParallel(PipelineKeys, ShardedBase):
    strategy: str = "pp-fsdp-tp"
    pp: int = 2
    tp: int = 2
    sequence_parallel: bool = False


@dataclass(frozen=True)
class Schedule:
    """A torch.distributed.pipelining schedule as effitrain offers it.

    Args:
        cls: its class in torch.distributed.pipelining.schedules.
        style: loop (stage s on rank s % pp) or v (rank r holds stages r and 2 pp - 1 - r).
        per_rank: stages per rank it takes: "1", "2" or ">=2".
        split_backward: its backward runs in two actions, input gradients (I) then weight gradients (W) later.
    """

    cls: str
    style: str
    per_rank: str
    split_backward: bool = False


# every torch.distributed.pipelining schedule of torch 2.13, each training equal to single on 2 gloo ranks
# (tests/test_pipeline.py)
SCHEDULES = {"gpipe": Schedule("ScheduleGPipe", "loop", "1"), "1f1b": Schedule("Schedule1F1B", "loop", "1"),
             "interleaved-1f1b": Schedule("ScheduleInterleaved1F1B", "loop", ">=2"),
             "zero-bubble": Schedule("ScheduleInterleavedZeroBubble", "loop", ">=2", split_backward=True),
             "zbv": Schedule("ScheduleZBVZeroBubble", "v", "2", split_backward=True),
             "looped-bfs": Schedule("ScheduleLoopedBFS", "loop", ">=2"),
             "dualpipev": Schedule("ScheduleDualPipeV", "v", "2", split_backward=True)}


def _tp_plan(node, cfg) -> list[Need]:
    """A tensor-parallel degree above 1 needs the model family's plan."""
    from effitrain.launcher import world_size

    if parallel_degrees(node, world_size=world_size(cfg.launcher)).tp == 1:
        return []
    return [Need(TP_PLAN, f"needs a tensor-parallel plan of the model's blocks: {tp_plan_gap(cfg.model)}; use "
                          "parallel=fsdp or ddp")]


def _with_experts(*traits: str):
    """A layout's traits under parallel.ep: experts sharded, so no whole weights, no module a converter replaced
    (expert parallelism shards transformers' own experts tensors only), and no DDP communication hook (the experts'
    gradients stay out of DDP's buckets: a hook would compress only the rest; not built)."""
    def provides(node, _cfg) -> list[str]:
        if node.ep == 1:
            return list(traits)
        return [t for t in traits if t not in (WHOLE_WEIGHTS, CONVERTED_MODULES, COMM_HOOKS)] + [EXPERT_PARALLEL]
    provides.static = traits  # what the option provides at parallel.ep=1 (checks._unmet names its providers)
    provides.unless = lambda node: f"parallel.ep={node.ep}" if node.ep > 1 else None  # what took some away
    return provides


GROUP.traits("single", provides=(WHOLE_WEIGHTS, CONVERTED_MODULES))
GROUP.traits("ddp", provides=_with_experts(WHOLE_WEIGHTS, DDP, COMM_HOOKS, CONVERTED_MODULES))
GROUP.traits("fsdp", provides=_with_experts(SHARDS_PARAMS, FSDP_REDUCE, CONVERTED_MODULES))
GROUP.traits("hsdp", provides=(SHARDS_PARAMS, FSDP_REDUCE))
GROUP.traits("tp", provides=(TENSOR_PARALLEL,), needs=_tp_plan)
GROUP.traits("fsdp-tp", provides=(SHARDS_PARAMS, FSDP_REDUCE, TENSOR_PARALLEL), needs=_tp_plan)
# no CONVERTED_MODULES nor WHOLE_WEIGHTS: compression converters, muon and adafactor are refused by their own needs
GROUP.traits("pp", provides=(PIPELINE,))
GROUP.traits("pp-fsdp", provides=(PIPELINE, SHARDS_PARAMS))
GROUP.traits("pp-fsdp-tp", provides=(PIPELINE, SHARDS_PARAMS, TENSOR_PARALLEL), needs=_tp_plan)


def _check_layout(cfg, run) -> None:
    """The layout against the world size the launcher asks for, the model's heads and the sequence length."""
    from effitrain.launcher import world_size

    degrees = parallel_degrees(cfg, world_size=world_size(run.launcher))
    if "sequence_parallel" in cfg and cfg.sequence_parallel:
        # sequence parallel splits the TP group's activations along the sequence: no TP group, nothing to split
        _need(degrees.tp > 1, f"parallel.sequence_parallel=true needs a tensor-parallel degree > 1, not "
                              f"parallel.tp={degrees.tp}")
        _need(run.data.seq_len % degrees.tp == 0,
              f"parallel.sequence_parallel=true splits data.seq_len={run.data.seq_len} over parallel.tp="
              f"{degrees.tp} ranks; make data.seq_len a multiple of it")
    if degrees.tp > 1:
        for key, heads in attention_heads(run.model).items():  # each rank computes whole heads
            _need(heads % degrees.tp == 0, f"{key}={heads} is not divisible by the tensor-parallel degree {degrees.tp}")
    if degrees.ep > 1:
        _check_experts(cfg, run.model, ep=degrees.ep)


def _check_experts(cfg, model, *, ep: int) -> None:
    """parallel.ep > 1: a mixture-of-experts model whose plan effitrain applies, its experts split evenly."""
    gap = ep_plan_gap(model)
    _need(gap is None, f"parallel.ep={ep} needs a mixture-of-experts model with an expert-parallel plan; {gap} "
                       "(use parallel.ep=1)")
    experts = num_experts(model)
    _need(experts % ep == 0, f"parallel.ep={ep} does not divide the model's {experts} experts per layer; pick a "
                             "divisor of it")
    _need(not offloads(cfg), f"parallel.offload=cpu with parallel.ep={ep} is not built (FSDP would offload all but "
                             "the experts); use parallel.offload=null")
    # transformers' dispatch swaps the experts' DTensors for local tensors inside forward and reads the split sizes
    # back to the host: neither traces in a compiled block (not built, so refused)
    _need(not cfg.compile, f"parallel.compile=true with parallel.ep={ep} is not built (the expert dispatch does not "
                           "compile); use parallel.compile=false")


for _kind in GROUP.schemas:
    GROUP.check_of(_kind)(_check_layout)


def _check_pipeline(cfg, run) -> None:
    """A pipeline layout against the run: its schedule, microbatches, stages and the options it is tested with."""
    from effitrain.launcher import world_size

    _check_layout(cfg, run)
    degrees = parallel_degrees(cfg, world_size=world_size(run.launcher))
    _need(cfg.schedule in SCHEDULES, f"parallel.schedule={cfg.schedule!r} is not one of: {', '.join(SCHEDULES)}")
    _need(cfg.split in ("even", "cost"), f"parallel.split={cfg.split!r} is not one of: even, cost")
    schedule, spr = SCHEDULES[cfg.schedule], cfg.stages_per_rank
    _need(schedule.per_rank != "1" or spr == 1, f"parallel.schedule={cfg.schedule} runs one stage per rank, not "
          f"parallel.stages_per_rank={spr}; use interleaved-1f1b, zero-bubble or zbv for more")
    _need(schedule.per_rank != "2" or spr == 2, f"parallel.schedule={cfg.schedule} runs exactly 2 stages per rank "
          f"(a V), not parallel.stages_per_rank={spr}")
    _need(schedule.per_rank != ">=2" or spr >= 2, f"parallel.schedule={cfg.schedule} interleaves several stages per "
          f"rank: set parallel.stages_per_rank >= 2 (not {spr}), or use gpipe or 1f1b")
    gap = pp_plan_gap(run.model)  # before the blocks are counted: a checkpoint of another family may have none
    _need(gap is None, f"parallel={cfg.name} cannot split this model: {gap}")
    stages, m = degrees.pp * spr, cfg.microbatches
    key, layers = num_layers(run.model)
    _need(layers >= stages, f"{key}={layers} cannot fill {stages} pipeline stages (parallel.pp={degrees.pp} x "
          f"parallel.stages_per_rank={spr}); one block per stage at least")
    _need(m >= 1 and run.batch_size % m == 0, f"parallel.microbatches={m} does not divide batch_size="
          f"{run.batch_size} (sequences per data-parallel rank and micro-step); pick a divisor")
    _need(cfg.schedule not in ("1f1b", "zbv", "dualpipev") or m >= stages, f"parallel.schedule={cfg.schedule} needs "
          f"parallel.microbatches >= the {stages} stages, not {m}")
    rounds = max(1, m // degrees.pp)  # torch's interleaved schedules run the microbatches in rounds of pp
    _need(schedule.per_rank != ">=2" or m % rounds == 0, f"parallel.schedule={cfg.schedule} runs microbatches in "
          f"rounds of parallel.pp={degrees.pp}: parallel.microbatches={m} must be a multiple of {rounds}")
    _check_pipeline_options(cfg, run)


def _check_pipeline_options(cfg, run) -> None:
    """What a pipeline layout is not tested with yet: one line each."""
    from effitrain.data import sample_sources

    what = f"parallel={cfg.name}"
    _need(run.precision.name == "fp32", f"{what} is tested in fp32 only (the schedule runs backward itself: no "
          f"autocast or loss scaler around it yet), not precision={run.precision.name}")
    key, tied = tied_embeddings(run.model)
    fix = "use a checkpoint with untied embeddings" if run.model.pretrained else "set model.tie_embeddings=false"
    _need(not tied, f"{what}: {key}=true shares the embedding (first stage) with the head (last stage); {fix}")
    _need(cfg.activation_checkpointing == "none" and not cfg.compile, f"{what}: activation checkpointing and compile "
          "inside pipeline stages are not tested yet; set parallel.activation_checkpointing=none and "
          "parallel.compile=false")
    _need(not list(run.eval.tasks), f"{what}: eval.tasks score choices on whole models; the stages hold parts of it")
    _need("source" not in run.data or not sample_sources(run.data),
          f"{what} trains on token windows; fine-tuning data (data={run.data.name}) is not tested under it yet")
    _need(not offloads(cfg), f"{what}: parallel.offload=cpu is not tested under a pipeline yet")
    # the weight-gradient action differentiates the stage's registered parameters: resharded after forward, those are
    # the shards, which the forward did not use, and the blocks' weight gradients would be lost
    _need(not (SCHEDULES[cfg.schedule].split_backward and cfg.get("reshard_after_forward", False)),
          f"{what}: parallel.schedule={cfg.schedule} computes weight gradients apart from the backward, which needs "
          "each stage's parameters kept gathered from forward to backward: set parallel.reshard_after_forward=false")


for _kind in ("pp", "pp-fsdp", "pp-fsdp-tp"):
    GROUP.check_of(_kind)(_check_pipeline)


@GROUP.checks
def check(cfg) -> None:
    if cfg.activation_checkpointing not in ("none", "full", "selective"):
        raise UsageError(f"parallel.activation_checkpointing={cfg.activation_checkpointing!r} is not one of: "
                         "none, full, selective")
    if cfg.ac_every < 1:
        raise UsageError(f"parallel.ac_every={cfg.ac_every} must be >= 1")
    if "offload" in cfg and cfg.offload not in (None, "cpu"):
        raise UsageError(f"parallel.offload={cfg.offload!r} is not one of: null, cpu")


def mixes_dtensors(cfg) -> bool:
    """ddp with parallel.ep > 1 holds DTensor experts beside plain replicas, so its optimizer's parameter groups split
    by that (optimizer.build.param_groups): its optimizer state does not load into ddp without ep, nor back."""
    return cfg.strategy == "ddp" and "ep" in cfg and cfg.ep > 1  # a run saved before parallel.ep: none


def offloads(cfg) -> bool:
    """True when FSDP keeps parameters, gradients and optimizer state on the host (the optimizer steps there)."""
    return "offload" in cfg and cfg.offload == "cpu"


@dataclass(frozen=True)
class Degrees:
    """How the world splits: pipeline ranks x data-parallel replicas x data-parallel shards x tensor-parallel ranks;
    expert-parallel ranks are borrowed from the data-parallel ones (each holds 1/ep of the experts and reads its own
    batch)."""

    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int = 1
    pp: int = 1  # pipeline ranks: each holds its stages' layers (pp is the outermost mesh dimension)

    @property
    def dp(self) -> int:
        """Data-parallel world size: ranks that read different batches."""
        return self.dp_replicate * self.dp_shard


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def parallel_degrees(cfg, *, world_size: int) -> Degrees:
    """The one place parallel degrees are checked against the world size (CLI and workers both call it)."""
    s = cfg.strategy
    _need(s != "single" or world_size == 1,
          f"parallel=single runs one process but the world size is {world_size}; "
          "choose parallel=ddp, fsdp, fsdp-zero2, hsdp, tp, fsdp-tp, pp, pp-fsdp or pp-fsdp-tp, or "
          "launcher.nproc_per_node=1")
    tp = 1
    if "tp" in cfg:
        tp = world_size if cfg.tp == -1 else cfg.tp
        _need(tp >= 1 and world_size % tp == 0,
              f"parallel.tp={cfg.tp} does not divide the world size {world_size} "
              "(launcher.nproc_per_node x launcher.nnodes); pick a divisor")
    _need(s != "tp" or tp == world_size,
          f"parallel=tp uses all {world_size} ranks for one tensor-parallel group but parallel.tp={tp}; "
          "use parallel=fsdp-tp for tensor x data parallel")
    pp = _pp_degree(cfg, world_size=world_size, tp=tp)
    _need(world_size % (tp * pp) == 0, f"parallel.pp={pp} x parallel.tp={tp} = {pp * tp} does not divide the world "
          f"size {world_size} (launcher.nproc_per_node x launcher.nnodes); make pp x tp x dp_shard the world size")
    dp = world_size // (tp * pp)
    replicate = {"ddp": dp, "hsdp": cfg.dp_replicate if s == "hsdp" else 1}.get(s, 1)
    _need(replicate >= 1 and dp % replicate == 0,
          f"parallel.dp_replicate={replicate} does not divide the {dp} data-parallel ranks")
    shard = 1 if s in ("single", "ddp", "tp", "pp") else (dp // replicate if cfg.dp_shard == -1 else cfg.dp_shard)
    _need(replicate * shard == dp,
          f"parallel.dp_replicate={replicate} x parallel.dp_shard={shard} = {replicate * shard}, but the world "
          f"size {world_size} / (parallel.tp={tp} x parallel.pp={pp}) leaves {dp} data-parallel ranks; make the "
          f"product {dp}")
    ep = cfg.ep if "ep" in cfg else 1
    _need(ep >= 1 and dp % ep == 0, f"parallel.ep={ep} does not divide the {dp} data-parallel ranks "
                                    "(launcher.nproc_per_node x launcher.nnodes); pick a divisor")
    return Degrees(dp_replicate=replicate, dp_shard=shard, tp=tp, ep=ep, pp=pp)


def _pp_degree(cfg, *, world_size: int, tp: int) -> int:
    """Pipeline ranks: parallel=pp takes every rank; pp-fsdp(-tp) leaves world size / (pp x tp) ranks to FSDP."""
    if "pp" not in cfg:
        return 1
    if cfg.pp == -1:  # pp-fsdp(-tp): what dp_shard and tp leave (pp or dp_shard must be set)
        shard = cfg.dp_shard if "dp_shard" in cfg else 1
        _need(shard != -1, "parallel.pp=-1 and parallel.dp_shard=-1: set one of them")
        _need(world_size % (shard * tp) == 0, f"parallel.dp_shard={shard} x parallel.tp={tp} does not divide the "
              f"world size {world_size}")
        return world_size // (shard * tp)
    _need(cfg.pp >= 1 and world_size % cfg.pp == 0, f"parallel.pp={cfg.pp} does not divide the world size "
          f"{world_size} (launcher.nproc_per_node x launcher.nnodes); pick a divisor")
    _need(cfg.strategy != "pp" or cfg.pp == world_size, f"parallel=pp uses all {world_size} ranks as pipeline stages "
          f"but parallel.pp={cfg.pp}; use parallel=pp-fsdp for pipeline x data parallel")
    return cfg.pp
