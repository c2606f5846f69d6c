"""Builders of the `parallel` group: apply_parallel applies a layout to a model built on the meta device.

Order, and why: PP split -> TP or EP -> activation checkpointing -> compile -> FSDP/DDP.
  0. The pipeline split first (parallel/pipeline.py): each rank drops the blocks, embedding and head its stages do
     not own, so everything after wraps only what this rank keeps (pp-fsdp: FSDP on that part; pp-fsdp-tp: TP,
     then FSDP; AC and compile are not combined with a pipeline yet: refused before launch).
  1. TP: it replaces each block's Linear weights with DTensors sharded over the TP mesh; everything
     after must see those final parameters. EP (parallel.ep, parallel/experts.py) likewise makes the experts DTensors
     sharded over the EP mesh, which FSDP and DDP then leave alone.
  2. Activation checkpointing wraps whole blocks, so recomputation in backward covers the TP collectives too.
  3. compile is regional (each block, not the whole model): identical blocks share one compiled graph, and
     the FSDP hooks applied next stay outside the compiled regions, where they belong.
  4. FSDP last: it shards whatever parameters it finds (TP DTensors become 2-D DTensors) and hooks each
     block's forward/backward for all-gather and reduce-scatter. DDP too, as it needs real parameters.
Parameters stay on the meta device until after sharding, so each rank allocates only its own shard; then
they are materialised and filled by the layout-independent `init` (identical weights for every layout).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from effitrain.errors import UsageError
from effitrain.model.build import transformer_blocks
from effitrain.parallel import DDP, GROUP, PIPELINE, SHARDS_PARAMS, TENSOR_PARALLEL, Degrees
from effitrain.parallel.pipeline import split_model
from effitrain.parallel.pipeline_cost import PipelineCost


class ParallelError(UsageError):
    """An impossible parallel layout: reported as one line, exit code 2."""


def apply_parallel(model: nn.Module, *, cfg, job, precision, init: Callable[[nn.Module], None] | None = None
                   ) -> nn.Module:
    """Wrap `model` for the `parallel` group's layout (its strategy's builder), in the order the module docstring
    explains.

    Args:
        model: the built model: parameters on the meta device (then `init` fills them), or real (a checkpoint).
        cfg: the `parallel` config group.
        job: the process's Job (engine/job.py: its World and the layout's mesh, built once).
        precision: the run's Precision (FSDP mixed-precision policy when it offers one).
        init: fills materialised parameters deterministically (model.build.init_weights bound to the run's seed).
    """
    return GROUP.builder_of(cfg.strategy)(model, cfg=cfg, world=job.world, mesh=job.mesh, precision=precision,
                                          init=init)


def _blocks(model: nn.Module, cfg) -> None:
    """Steps 2 and 3 of every layout: activation checkpointing, then regional compile."""
    apply_ac(model, mode=cfg.activation_checkpointing, every=cfg.ac_every)
    if cfg.compile:
        apply_compile(model)


@GROUP.builder("single")
def single(model, *, cfg, world, mesh, precision, init):
    _blocks(model, cfg)
    return _materialise(model, device=world.device, init=init)


@GROUP.builder("ddp")
def ddp(model, *, cfg, world, mesh, precision, init):
    experts = _experts(model, cfg=cfg, world=world)
    _blocks(model, cfg)
    model = _materialise(model, device=world.device, init=init)
    if experts:
        from effitrain.parallel.experts import hide_from_ddp

        experts.average_grads(model, dp=world.size)
        hide_from_ddp(model)
    return apply_ddp(model, world=world)


def _sharded(model, *, cfg, world, mesh, precision, init):
    experts = _experts(model, cfg=cfg, world=world)
    _blocks(model, cfg)
    apply_fsdp(model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, offload=cfg.offload,
               mp_policy=precision.fsdp_mixed_precision(), ignored=experts.params if experts else None)
    model = _materialise(model, device=torch.device("cpu") if cfg.offload else world.device, init=init)
    if experts:
        experts.average_grads(model, dp=world.size)
    return model


def _experts(model, *, cfg, world):
    """Step 1 under parallel.ep > 1: the experts sharded over the EP ranks (parallel/experts.py), or None."""
    if "ep" not in cfg or cfg.ep == 1:
        return None
    from effitrain.parallel.experts import apply_ep

    return apply_ep(model, ep=cfg.ep, device=world.device)


GROUP.builder("fsdp")(_sharded)
GROUP.builder("hsdp")(_sharded)


@GROUP.builder("tp")
def tp(model, *, cfg, world, mesh, precision, init):
    apply_tp(model, mesh=mesh["tp"], sequence_parallel=cfg.sequence_parallel)
    _blocks(model, cfg)
    return _materialise(model, device=world.device, init=init)


@GROUP.builder("fsdp-tp")
def fsdp_tp(model, *, cfg, world, mesh, precision, init):
    apply_tp(model, mesh=mesh["tp"], sequence_parallel=cfg.sequence_parallel)
    return _sharded(model, cfg=cfg, world=world, mesh=mesh["dp_shard"], precision=precision, init=init)


@GROUP.builder("pp")
def pp(model, *, cfg, world, mesh, precision, init):
    """The pipeline split (parallel/pipeline.py), then AC and compile, which the checks keep off under a pipeline."""
    split_model(model, cfg=cfg, mesh=mesh)
    _blocks(model, cfg)
    return _materialise(model, device=world.device, init=init)


@GROUP.builder("pp-fsdp")
def pp_fsdp(model, *, cfg, world, mesh, precision, init):
    """The split, then FSDP2 inside each stage's data-parallel group (mesh["dp_shard"]): its blocks, then each stage."""
    stages = split_model(model, cfg=cfg, mesh=mesh)
    return _stage_fsdp(model, stages, cfg=cfg, world=world, mesh=mesh, precision=precision, init=init)


@GROUP.builder("pp-fsdp-tp")
def pp_fsdp_tp(model, *, cfg, world, mesh, precision, init):
    """3-D, in the module docstring's order: the split, TP over mesh["tp"] on what the stage keeps, then FSDP2 over
    mesh["dp_shard"] (the TP DTensors become 2-D (dp_shard, tp) DTensors, as under fsdp-tp). A stage sends its hidden
    states to the same (dp_shard, tp) coordinate of the next stage, which reads the same batch."""
    stages = split_model(model, cfg=cfg, mesh=mesh)
    apply_tp(model, mesh=mesh["tp"], sequence_parallel=cfg.sequence_parallel)
    if cfg.sequence_parallel:
        for stage in stages:  # before FSDP's hooks, which then see plain tensors
            _whole_sequence_between_stages(stage, mesh["tp"])
    return _stage_fsdp(model, stages, cfg=cfg, world=world, mesh=mesh, precision=precision, init=init)


def _whole_sequence_between_stages(model: nn.Module, mesh) -> None:
    """SP under a pipeline: stages exchange plain tensors of the whole sequence, as torch.distributed.pipelining
    and Pipeline.eval_loss allocate them. A stage's hidden-states input becomes the sequence shards its first norm
    takes (a local slice, no communication); its sequence-sharded output is all-gathered (the last stage's logits
    are gathered already). Each boundary sends tp-fold more than the shards, for stages that need no shapes but
    the whole model's."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def shard_input(_module, args):
        (x,) = args
        if not x.is_floating_point():  # token ids: stage 0's embedding shards its output itself
            return None
        return (DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]),)

    def gather_output(_module, _args, output):
        return output.redistribute(mesh, [Replicate()]).to_local() if isinstance(output, DTensor) else None

    model.register_forward_pre_hook(shard_input)
    model.register_forward_hook(gather_output)


def _stage_fsdp(model, stages, *, cfg, world, mesh, precision, init):
    """FSDP2 over mesh["dp_shard"] on a pipeline rank's part: its blocks, then each stage as a root of its own (the
    schedule gathers, reshards and reduces a stage's FSDP modules as one); then materialised."""
    _blocks(model, cfg)
    apply_fsdp(model, mesh=mesh["dp_shard"], reshard_after_forward=cfg.reshard_after_forward, offload=cfg.offload,
               mp_policy=precision.fsdp_mixed_precision(), roots=stages)
    return _materialise(model, device=world.device, init=init)


def build_mesh(cfg, d: Degrees, *, world):
    """The device mesh of the layout, from what it provides (None for single/ddp, which use the default process
    group). Dimension order is (pp, dp_replicate, dp_shard, tp): TP innermost, so a TP group is one node's fast link;
    PP outermost (torchtitan's order), as its point-to-point sends are the fewest bytes and can cross nodes."""
    from torch.distributed.device_mesh import init_device_mesh

    sizes = {"pp": d.pp if GROUP.provides(cfg, PIPELINE) else None,
             "dp_replicate": d.dp_replicate if "dp_replicate" in cfg else None,
             "dp_shard": d.dp_shard if GROUP.provides(cfg, SHARDS_PARAMS) else None,
             "tp": d.tp if GROUP.provides(cfg, TENSOR_PARALLEL) else None}
    dims = tuple(name for name, size in sizes.items() if size is not None)
    if not dims:
        return None
    return init_device_mesh(world.device.type, tuple(sizes[n] for n in dims), mesh_dim_names=dims)


def apply_tp(model: nn.Module, *, mesh, sequence_parallel: bool = False) -> None:
    """Megatron-style tensor parallelism over DTensor, by the family's own plan: transformers' `base_model_tp_plan`
    (model.tp_plan_gap says which families have one effitrain can apply), or effitrain's gpt2 plan.

    Attention q/k/v and the MLP's input projections are column-wise (each rank owns whole heads / a slice of the
    MLP width), the attention output and MLP output projections row-wise (their partial outputs are summed by one
    all-reduce per sub-layer). Fused projections whose output the model slices (phi3's qkv_proj, olmo2's q/k before
    their norm over the whole projection) gather their output and the next projection splits its input again, as
    the plan says. The token embedding is sharded over the vocabulary and the LM head over its outputs (gathered
    for the loss); every other parameter (norms, GPT-2's position embedding) is a replicated DTensor, so every
    parameter is a DTensor and grad clipping sees one mesh.

    Sequence parallel replaces each all-reduce by a reduce-scatter to sequence shards (Shard(1)) and an all-gather
    (Shard(1) -> Replicate) before the next sub-layer: same bytes moved, but norms, dropout and the residual
    stream run on T/tp tokens per rank. The residual stream then stays a DTensor of the global shape, because
    transformers derives positions, the causal mask and rotary tables from the embedding output's shape.

    Args:
        model: a causal LM (gpt2 linearised by model.build.build_model; parameters may be on meta).
        mesh: the 1-D tensor-parallel device mesh.
        sequence_parallel: shard activations outside attention/MLP along the sequence (Megatron SP).
    """
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from effitrain.model import tp_plan_gap_of

    gpt2 = model.config.model_type == "gpt2"
    gap = tp_plan_gap_of(model.config.model_type, model.config.to_dict())
    if gap:  # checked before launch (model.tp_plan_gap); here for a caller that did not
        raise ParallelError(f"no tensor-parallel plan: {gap}; use parallel=fsdp or ddp")
    tied = _tied(model)
    for block in transformer_blocks(model):
        if not _has_parameters(block):  # a pipeline stage's pass-through for another stage's block
            continue
        plan = _gpt2_block_plan(sequence_parallel) if gpt2 else _family_block_plan(model.config, block,
                                                                                   sequence_parallel)
        parallelize_module(block, mesh, plan)
        if gpt2:  # GPT2Attention splits c_attn's output into q, k, v by split_size: now the local width
            block.attn.split_size = block.attn.embed_dim // mesh.size()
    parallelize_module(model, mesh, _root_plan(model, sequence_parallel))
    if tied:  # both plans shard the shared [vocab, d] weight along dim 0: point the head at the embedding's
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if gpt2:  # positions are few: replicate, and hand the residual stream the layout it has
        _replicate(model.base_model.wpe, mesh, output_layout=Shard(1) if sequence_parallel else None)
    for module in model.modules():  # what no plan shards (norms, ...): replicated, computing on plain tensors
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            _replicate(module, mesh)


def _family_block_plan(config, block: nn.Module, sp: bool) -> dict:
    """A decoder block's plan from transformers' base_model_tp_plan ("layers.*.self_attn.q_proj": "colwise", ...),
    each style mapped onto torch's; under SP the block's own norms shard the sequence and its attention and MLP
    gather it."""
    from torch.distributed.tensor.parallel import SequenceParallel

    plan = {pattern.removeprefix("layers.*."): _STYLES[style](sp)
            for pattern, style in config.base_model_tp_plan.items()}
    if sp:
        for name, child in block.named_children():
            if "norm" in type(child).__name__.lower():
                plan[name] = SequenceParallel()
        # the decoder layers call self_attn with hidden_states as a keyword, the MLP positionally
        plan |= {"self_attn": _gather_sequence(kwarg="hidden_states"), "mlp": _gather_sequence()}
    return plan


def _root_plan(model: nn.Module, sp: bool) -> dict:
    """The embedding (vocabulary-sharded), the LM head and, under SP, the final norm."""
    from torch.distributed.tensor.parallel import SequenceParallel

    base = model.base_model_prefix
    embed = "wte" if model.config.model_type == "gpt2" else "embed_tokens"
    plan = {f"{base}.{embed}": _vocab_embedding(sp), "lm_head": _lm_head(sp)}
    if sp:
        plan[f"{base}.{'ln_f' if embed == 'wte' else 'norm'}"] = SequenceParallel()
    return {path: style for path, style in plan.items() if _has_params(model, path)}  # a pipeline stage holds some


def _has_params(model: nn.Module, path: str) -> bool:
    """False where a pipeline stage dropped the module (None) or left a parameterless stand-in (Identity)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    return module is not None and _has_parameters(module)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _colwise(*, gather: bool):
    """Column-wise: the output stays sharded (whole heads per rank), or is gathered when the model slices it."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel

    return ColwiseParallel(output_layouts=Replicate()) if gather else ColwiseParallel()


def _rowwise_split_input(sp: bool):
    """Row-wise on a replicated input (after a gathered column-wise output): each rank takes its slice."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import RowwiseParallel

    if sp:
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False)
    return RowwiseParallel(input_layouts=Replicate())


def _per_head_norm(sp: bool):
    """transformers' "replicated_with_grad_allreduce": a replicated norm over each head (qwen3's q_norm/k_norm)
    between a column-wise projection and attention. Its input is this rank's heads, [..., heads, head_dim], so it is
    declared sharded on the heads dim: the weight's gradient is then a partial sum over ranks, which DTensor
    reduces (each rank alone would hold only its own heads' share)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import ParallelStyle

    class PerHeadNorm(ParallelStyle):
        def _apply(self, module, mesh):
            from torch.distributed.tensor import distribute_module

            def to_dtensor(_module, inputs, mesh):
                return tuple(DTensor.from_local(x, mesh, [Shard(x.dim() - 2)], run_check=False) for x in inputs)

            return distribute_module(module, mesh, input_fn=to_dtensor,
                                     output_fn=lambda _module, output, _mesh: output.to_local())

    return PerHeadNorm()


# transformers' tensor-parallel style names (base_model_tp_plan) -> torch's styles, given sequence parallel
_STYLES = {"colwise": lambda sp: _colwise(gather=False), "rowwise": lambda sp: _rowwise(sp),
           "colwise_gather_output": lambda sp: _colwise(gather=True),
           "rowwise_split_input": lambda sp: _rowwise_split_input(sp),
           "replicated_with_grad_allreduce": lambda sp: _per_head_norm(sp)}


def _gpt2_block_plan(sp: bool) -> dict:
    """gpt2's block plan (transformers has none; the Linear form of model.build.linearise_gpt2): q/k/v and c_fc
    column-wise, both c_proj row-wise."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    block = {f"attn.c_attn.{p}_proj": ColwiseParallel() for p in "qkv"}
    block |= {"attn.c_proj": _rowwise(sp), "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": _rowwise(sp)}
    if sp:
        from torch.distributed.tensor.parallel import SequenceParallel

        block |= {"ln_1": SequenceParallel(), "attn": _gather_sequence(), "ln_2": SequenceParallel(),
                  "mlp": _gather_sequence()}
    return block


def _rowwise(sp: bool):
    """Output projection: partial sums all-reduced to a replicated local tensor, or (SP) reduce-scattered to
    sequence shards kept as a DTensor (the residual stream's layout)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import RowwiseParallel

    return RowwiseParallel(output_layouts=Shard(1), use_local_output=False) if sp else RowwiseParallel()


def _vocab_embedding(sp: bool):
    """Token embedding sharded over the vocabulary: partial lookups summed (all-reduce; SP: reduce-scatter).

    The sum completes before the embedding returns (torch's RowwiseParallel leaves it asynchronous): llama feeds
    the embedding output straight into block 0, and a compiled block traced on a pending collective's result is
    reused for the later blocks, which get plain tensors (compile then fails in backward or in evaluation).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import RowwiseParallel

    class SyncRowwiseParallel(RowwiseParallel):
        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            outputs = outputs.redistribute(placements=output_layouts, async_op=False)
            return outputs.to_local() if use_local_output else outputs

    if sp:
        return SyncRowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False)
    return SyncRowwiseParallel(input_layouts=Replicate())


def _lm_head(sp: bool):
    """LM head sharded over its outputs (the vocabulary), logits gathered for the loss; under SP its input is the
    sequence-sharded final norm output (all-gathered first)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel

    return ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate())


def _gather_sequence(kwarg: str | None = None):
    """SP: all-gather a sub-layer's sequence-sharded input into the whole sequence, as a local tensor (the
    column-wise projections inside take it as replicated)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    if kwarg:
        return PrepareModuleInput(input_kwarg_layouts={kwarg: Shard(1)},
                                  desired_input_kwarg_layouts={kwarg: Replicate()}, use_local_output=True)
    return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)


def _replicate(module: nn.Module, mesh, *, output_layout=None) -> None:
    """Replicated DTensor parameters for a module that computes on plain tensors (a norm, a position embedding).
    Its output goes back to a plain tensor, or is redistributed to `output_layout` (kept a DTensor)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def to_dtensor(_module, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

    def to_output(_module, output, mesh):
        return output.to_local() if output_layout is None else output.redistribute(mesh, [output_layout])

    distribute_module(module, mesh, input_fn=to_dtensor, output_fn=to_output)


def apply_ac(model: nn.Module, *, mode: str, every: int) -> None:
    """Activation checkpointing of whole transformer blocks: their activations are recomputed in backward.

    Args:
        model: the causal LM.
        mode: none, full (every block) or selective (every `every`-th block: less memory saved, less recompute).
        every: the selective stride.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    if mode == "none":
        return

    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        if mode == "full" or i % every == 0:
            # non-reentrant: works with kwargs, DTensors and compile, and needs no input requiring grad
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each transformer block in place (regional: one graph serves every identical block,
    so compile time stays that of one block, and parameter names do not change)."""
    for block in transformer_blocks(model):
        # under activation checkpointing, compile the block inside the wrapper (checkpoint stays eager, recompute
        # reruns the compiled forward): dynamo tracing the checkpoint of a TP block fails in torch 2.13 (it saves
        # the DTensors' DeviceMesh among the tensors kept for backward)
        getattr(block, "_checkpoint_wrapped_module", block).compile()


def apply_fsdp(model: nn.Module, *, mesh, reshard_after_forward: bool, offload, mp_policy,
               ignored: set | None = None, roots: list[nn.Module] | None = None) -> None:
    """FSDP2 (`fully_shard`) on each transformer block, then on the root (embeddings, final norm, head).

    Args:
        model: the causal LM (parameters may be on the meta device).
        mesh: 1-D mesh = FSDP; 2-D (replicate, shard) mesh = HSDP.
        reshard_after_forward: True frees gathered parameters after forward (ZeRO-3, less memory, one more
            all-gather in backward); False keeps them until backward (ZeRO-2-like, less communication).
        offload: "cpu" keeps sharded parameters, gradients and optimizer state in host memory.
        mp_policy: a MixedPrecisionPolicy (param / reduce dtypes), or None for full precision.
        ignored: parameters FSDP leaves as they are (expert-parallel experts: already sharded, reduced by EP).
        roots: the modules wrapped after the blocks, each a root of its own (a pipeline rank's stages); [model].
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    # pinned host memory speeds host<->GPU copies, but pinning needs an accelerator: a CPU mesh keeps plain memory
    offload_policy = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if offload == "cpu" else OffloadPolicy()
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "offload_policy": offload_policy,
              "ignored_params": ignored or None}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in transformer_blocks(model):
        if _has_parameters(block):  # a pipeline stage's pass-through for another stage's block has none
            fully_shard(block, **kwargs)
    for root in roots or [model]:
        fully_shard(root, **kwargs)


def apply_ddp(model: nn.Module, *, world) -> nn.Module:
    """DistributedDataParallel: full replicas, gradients all-reduced in buckets overlapping backward."""
    from torch.nn.parallel import DistributedDataParallel

    # no buffer broadcast before each forward: the only buffers (rotary frequencies) are constants. torch 2.13
    # renamed the switch (and warns at the old name); older releases only have broadcast_buffers.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                                   **no_sync)


def _materialise(model: nn.Module, *, device: torch.device, init) -> nn.Module:
    """Allocate meta parameters (only this rank's shards) on `device` and fill them with `init`."""
    if not any(p.is_meta for p in model.parameters()):
        return model.to(device)  # a loaded checkpoint: already real
    # to_empty also re-allocates the buffers; they were computed at build (rotary frequencies), so keep them
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    tied = _tied(model)
    model.to_empty(device=device)
    if tied and not _tied(model):  # plain meta parameters are replaced one by one, which unties shared ones
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    init(model)
    return model


def _tied(model: nn.Module) -> bool:
    """True when the LM head shares the input embedding's weight (tie_embeddings); a pipeline stage may hold
    neither (None, or an Identity in the head's place)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return embedding is not None and getattr(head, "weight", None) is embedding.weight


def gradient_sync_skipper(model: nn.Module):
    """A context factory that skips gradient reduction for accumulation micro-steps, or None.

    DDP has `no_sync`; FSDP2 modules switch reduce-scatter off with `set_requires_gradient_sync` (their
    unsharded gradients then accumulate locally until the last micro-step reduces them once).
    """
    from torch.distributed.fsdp import FSDPModule

    if hasattr(model, "no_sync"):
        return model.no_sync
    if isinstance(model, FSDPModule):
        @contextmanager
        def skip_reduce_scatter():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return skip_reduce_scatter
    return None


# ---------------------------------------------------------------- cost models (effitrain estimate)
# Cost models of the `parallel` group (torch-free): how a layout splits each parameter over the ranks and what

FP32 = 4


@dataclass(frozen=True)
class Cost:
    """A layout's memory on one rank, from what the layout provides (its traits, parallel/__init__.py):
    SHARDS_PARAMS: FSDP2 shards parameters, gradients and optimizer state over the dp_shard ranks (dim 0, padded)
    and its MixedPrecisionPolicy computes with parameters in the autocast dtype; DDP: a flat copy of the trained
    parameters' gradients in its buckets (effitrain's DDP does not use gradient_as_bucket_view).

    Args:
        node: the `parallel` node.
    """

    node: object

    @property
    def shards(self) -> bool:
        return GROUP.provides(self.node, SHARDS_PARAMS)

    def local_numel(self, p, d: Degrees) -> int:
        """Elements this rank holds of a parameter: TP splits linears/embeddings, FSDP shards dim 0 (padded); EP
        splits an experts tensor's expert dim, and FSDP leaves it so."""
        shape = list(p.shape)
        if d.ep > 1 and _is_expert(p.name):
            return math.prod(shape) // d.ep
        if d.tp > 1 and p.kind in ("linear", "embedding", "head"):
            shape[0] = math.ceil(shape[0] / d.tp)  # column- or row-wise: one dim split either way
        if self.shards:
            shape[0] = math.ceil(shape[0] / d.dp_shard)
        return math.prod(shape)

    def memory(self, s, *, d: Degrees, spec, n_trained: int) -> dict[str, int]:
        """What the layout adds per rank (bytes), beside parameters, gradients and optimizer state."""
        mem = {}
        if GROUP.provides(self.node, DDP):  # the gradients of trained parameters only, experts under EP aside
            experts = sum(self.local_numel(p, d) for p in s.params if p.trainable and _is_expert(p.name)) \
                if d.ep > 1 else 0
            mem["ddp_buckets"] = (n_trained - experts) * spec.bytes("param")
        if self.shards:
            mem |= _fsdp_memory(s, self.node, d=d, spec=spec)
        return mem


def gather_bytes(spec) -> int:
    """Bytes per element of FSDP's gathered parameters: MixedPrecisionPolicy's param dtype (the autocast dtype)."""
    return spec.bytes("compute") if spec.autocast else spec.bytes("param")


def _fsdp_memory(s, node, *, d: Degrees, spec) -> dict[str, int]:
    """FSDP2's gathered parameters: the root's (embeddings, final norm, head), plus two blocks at a time (one
    computing, one prefetched), or every block with reshard_after_forward false; the root's unsharded gradients,
    which wait for its reduce-scatter at the end of backward (frozen ones have none); a block's backward holds its
    own unsharded gradients and the previous block's reduce-scatter input (in the reduce dtype), which FSDP2 keeps
    until the next reduce-scatter is issued (profiler allocation events of a 2-rank d128-L4 step). Under EP the
    experts are no FSDP parameters: neither gathered nor reduce-scattered."""
    experts = sum(p.numel for p in s.params if _is_expert(p.name)) // s.layers if d.ep > 1 else 0
    per_block = s.block_params() // s.layers - experts
    blocks = s.layers if not node.reshard_after_forward else min(2, s.layers)
    gathered = (s.root_params() + blocks * per_block) // d.tp
    return {"fsdp_gathered_params": gathered * gather_bytes(spec),
            "fsdp_unsharded_grads": (s.trained_root_params() // d.tp) * FP32,
            "fsdp_block_reduce": (s.trained_params_per_block() - experts) // d.tp
            * (gather_bytes(spec) + spec.bytes("reduce"))}


def _is_expert(name: str) -> bool:
    """A routed experts tensor (base.flops.expert_params' rule): what parallel.ep shards."""
    return ".experts." in f".{name}"


def _pipeline_cost(node) -> PipelineCost:
    """The pipeline layouts' cost model (parallel/pipeline_cost.py), sharding inside a stage as Cost does."""
    if GROUP.provides(node, TENSOR_PARALLEL):  # its activations are split over tp: not modelled, not measured
        raise UsageError(f"effitrain estimate does not cover parallel={node.name} yet (tensor parallelism inside "
                         "pipeline stages is not modelled); it covers pp and pp-fsdp")
    return PipelineCost(node, inner=Cost(node))


# every layout's memory follows from its traits: one cost model, registered for each (the pipeline layouts' is theirs)
for _strategy in GROUP.schemas:
    GROUP.cost(_strategy)(_pipeline_cost if _strategy.startswith("pp") else Cost)
