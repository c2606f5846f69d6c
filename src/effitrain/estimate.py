"""`effitrain estimate`: per-rank memory, FLOPs and time of a composed config, before anything runs.

The model is built on the meta device (shapes, no storage), so parameter counts and FLOPs are exactly what a run
reports (`flops.model_flops_per_token`), in seconds, for any size. Memory is counted in bytes per rank:

- model states: parameters, gradients and optimizer state by their dtypes and the layout's sharding (FSDP shards
  dim 0 with padding, TP splits linears and embeddings, ZeRO-1 assigns whole tensors to ranks greedily, largest
  first, as `ZeroRedundancyOptimizer` does; the most loaded rank is reported); DDP's gradient buckets (a flat copy
  of the gradients, since effitrain's DDP does not use `gradient_as_bucket_view`);
- activations: the tensors each op of a block saves for backward, counted per token and layer the way Korthikanti
  et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1) count them, for the
  blocks effitrain actually runs (transformers' llama/gpt2 with SDPA: a fused attention kernel saves q, k, v, its
  output and a log-sum-exp, never the a x s^2 score matrix; no dropout masks at dropout 0). Under autocast every
  Linear saves its own bf16 copy of an fp32 input (autocast casts activations per call). Full checkpointing keeps
  each block's input and recomputes one block at a time in backward; effitrain's `selective` checkpoints every
  `ac_every`-th block (block-level, not Korthikanti's attention-only recompute). TP splits heads and the MLP width;
  sequence parallel also splits the norms' activations (the Linear inputs stay gathered, as DTensor saves them);
- logits and loss: the vocab x tokens buffers of the LM head and cross entropy (logits, their fp32 copy, the
  log-softmax output and its gradients), usually the largest item of a small model;
- compression: each chosen method's cost model (compression/method.py's Cost, registered in the method's module)
  changes the meta model or its parameter list (freeze and LoRA's base weights frozen: no gradients, optimizer
  state or DDP buckets; LoRA's adapters; share-layers' blocks stored once; pruned weights) and adds its memory
  items (pruning masks, a distillation teacher and its loss buffers, PowerSGD's error feedback), the moments of
  the step they live in, and moments of its own (building the distillation loss);
- FSDP's gathered parameters: the root's (embeddings, final norm, head), plus two blocks at a time (one
  computing, one prefetched), or every block with reshard_after_forward false; with it (effitrain sets it on the
  root too) nothing is gathered when backward starts at the loss; a block's backward also holds its unsharded
  gradients and the previous block's reduce-scatter input.

The peak is the largest of the moments of a steady-state step (gradients are freed by zero_grad(set_to_none)):
the start of backward (model states, all saved activations, the loss's backward buffers), the recompute of a
checkpointed block, the first block's backward (the later blocks' gradients exist, one block's activations are
left) and the optimizer step (model states, gradients and the update's temporaries: foreach kernels build one fp32
temporary per parameter).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from effitrain.compression.method import Inputs, Step
from effitrain.data import run_data_config
from effitrain.errors import UsageError
from effitrain.parallel import GROUP as PARALLEL
from effitrain.parallel import PIPELINE, offloads, parallel_degrees
from effitrain.precision import spec as precision_spec

GiB = 2**30
DEFAULT_MFU = 0.35  # stated assumption when no matching run is recorded: a typical dense-LM MFU on a GPU
CPU_DEFAULT_MFU = 0.05  # a small model on shared CPU cores gets a few percent (BENCHMARKS.md, MFU on a CPU)


@dataclass
class Param:
    """One parameter as the memory model sees it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # embedding | head | norm | linear | bias | position
    trainable: bool = True  # False: frozen (freeze, LoRA's base weights): no gradient, no optimizer state
    pruned: bool = False  # pruning keeps a mask of it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def block(self) -> int | None:
        """The repeated block it belongs to, None outside the blocks (embeddings, final norm, head)."""
        return _block_of(self.name)


@dataclass
class Shape:
    """What the estimate needs of the model: its parameters and block dimensions (from the meta-built model)."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq_len: int
    tied: bool
    params: list[Param]
    flops_per_token: float
    detail: dict  # what the family's block adds (model.build's dimensions: head_dim, q/k norms, experts...)
    # (node, cost model, what its `read` found) of each chosen compression method, in the order they apply
    compression: list[tuple] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    def block_params(self) -> int:
        return sum(p.numel for p in self.params if _in_block(p.name))

    def root_params(self) -> int:
        return self.num_params - self.block_params()

    def trained_params_per_block(self) -> int:
        return sum(p.numel for p in self.params if p.trainable and _in_block(p.name)) // max(self.layers, 1)

    def trained_root_params(self) -> int:
        """Trainable parameters outside the blocks (embeddings, final norm, head): frozen ones get no gradient."""
        return sum(p.numel for p in self.params if p.trainable and not _in_block(p.name))


def _block_of(name: str) -> int | None:
    """The index of the repeated block a parameter belongs to (llama's model.layers.N, gpt2's transformer.h.N)."""
    m = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _in_block(name: str) -> bool:
    return _block_of(name) is not None


@dataclass
class Estimate:
    """Per-rank memory items (bytes), the peak and its moment, FLOPs and predicted time."""

    config: dict
    num_params: int
    memory: dict[str, int]
    activations_per_layer: int
    peak_bytes: int
    peak_phase: str
    moments: dict[str, int]  # bytes live at each moment of the step the peak is the largest of
    biggest: str
    flops_per_token: float
    flops_per_step: float
    tokens_per_step: int
    world_size: int
    mfu: float
    mfu_source: str
    peak_flops_per_device: float | None
    peak_flops_source: str
    step_time_s: float | None
    tokens_per_s: float | None
    tokens_per_day: float | None
    time_for_run_s: float | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def vocab_size(data_cfg) -> int:
    """The vocabulary the run will have: a given tokenizer's (a model.pretrained checkpoint's own: pass
    data.run_data_config(cfg)), else the BPE size it trains."""
    if data_cfg.tokenizer:
        from effitrain.data import read_tokenizer

        path = Path(data_cfg.tokenizer).expanduser()
        return read_tokenizer(path, what=f"data.tokenizer={data_cfg.tokenizer}").get_vocab_size()
    return data_cfg.vocab_size


def model_shape(model_cfg, *, vocab: int, seq_len: int, compression=None) -> Shape:
    """Build the model on the meta device (no storage), apply the compression methods that change its parameters,
    and read them; FLOPs as a run counts them. A model.pretrained checkpoint is built from its config.json."""
    from effitrain.base.flops import model_flops_per_token
    from effitrain.model.build import build_model, pretrained_on_meta

    if model_cfg.pretrained:
        model = pretrained_on_meta(model_cfg.pretrained)
    else:
        model = build_model(model_cfg, vocab_size=vocab, max_seq_len=seq_len, meta=True)
    flops = model_flops_per_token(model, seq_len=seq_len)  # before sharing: a shared block still runs every time
    methods = _compression_costs(compression)
    for node, cost in methods:
        if cost.meta is not None:
            model = cost.meta(model, node)
    params = _params(model)
    for node, cost in methods:
        if cost.params is not None:
            params = cost.params(model, params, node)
    return Shape(**_dimensions(model.config), vocab=vocab, seq_len=seq_len, params=params, flops_per_token=flops,
                 compression=[(node, cost, cost.read(node, _saved_params) if cost.read is not None else None)
                              for node, cost in methods])


def _compression_costs(compression) -> list[tuple]:
    """(node, cost model) of each chosen compression method, in the order their converters apply."""
    if compression is None:
        return []
    from effitrain.compression import GROUP, in_order

    return [(node, GROUP.cost_of(node.kind)) for node in in_order(compression) if node.kind != "none"]


def _saved_params(path: Path) -> int:
    """A saved model's parameters: from its config.json, or an effitrain run directory's saved config (nothing
    loaded). A compression method's cost model reads it (distill: the teacher's)."""
    from effitrain.model.build import build_model, pretrained_on_meta

    if (path / "config.json").is_file():
        return sum(p.numel() for p in pretrained_on_meta(path).parameters())
    from effitrain.received import load_run_config

    cfg = load_run_config(path, allow_external=True)  # read for its shape: nothing is launched
    run_vocab = vocab_size(cfg.data) if cfg.data.tokenizer else _tokenizer_vocab(path / "tokenizer.json")
    model = build_model(cfg.model, vocab_size=run_vocab, max_seq_len=cfg.data.seq_len, meta=True)
    return sum(p.numel() for p in model.parameters())


def _tokenizer_vocab(path: Path) -> int:
    from effitrain.data import read_tokenizer

    return read_tokenizer(path).get_vocab_size()


def _dimensions(config) -> dict:
    """The block dimensions of a transformers config (built here or read from a checkpoint), by its family's cost
    model: gpt2's, or llama's, which counts every llama-like decoder (a config with attention heads and an MLP
    width; model.build._decoder_dimensions)."""
    from effitrain.model import GROUP as MODEL

    family = "gpt2" if config.model_type == "gpt2" else "llama"
    if family == "llama" and not all(hasattr(config, k) for k in ("num_attention_heads", "intermediate_size")):
        raise UsageError(f"effitrain estimate models llama-like decoders and gpt2; this checkpoint is "
                         f"{config.model_type!r} (no num_attention_heads / intermediate_size in its config)")
    return {"family": family, **MODEL.cost_of(family).dimensions(config)}


def _params(model) -> list[Param]:
    from torch import nn

    kinds = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(prefix=module_name, recurse=False):
            kinds[id(p)] = _kind(name, module, nn)
    # named_parameters gives each tensor once: a tied head, or blocks shared by share-layers, are stored once
    return [Param(name, tuple(p.shape), kinds[id(p)], trainable=p.requires_grad)
            for name, p in model.named_parameters()]


def _kind(name: str, module, nn) -> str:
    if isinstance(module, nn.Embedding):
        return "position" if name.endswith("wpe.weight") else "embedding"
    if name.startswith("lm_head"):
        return "head"
    if "norm" in type(module).__name__.lower() or isinstance(module, nn.LayerNorm):
        return "norm"
    return "bias" if name.endswith("bias") else "linear"


# ---------------------------------------------------------------- model states


def model_state_bytes(n_params: int, *, stage: int, dp: int, mixed: bool = True, k: int = 12) -> dict[str, float]:
    """The ZeRO paper's accounting (Rajbhandari et al. 2020, fig. 1): fp16 parameters (2 bytes) and gradients
    (2 bytes) plus K bytes of optimizer state per parameter (Adam: fp32 master copy, momentum, variance = 12),
    partitioned over `dp` ranks by stage: 1 = optimizer state, 2 = + gradients, 3 = + parameters."""
    p, g = (2, 2) if mixed else (4, 4)
    part = lambda x, s: x / dp if stage >= s else x  # noqa: E731
    return {"parameters": part(p * n_params, 3), "gradients": part(g * n_params, 2),
            "optimizer_state": part(k * n_params, 1)}


# ---------------------------------------------------------------- activations


def activation_bytes_per_token(s: Shape, *, compute: int, residual: int, tp: int, sp: bool,
                               dropout: bool, attn_trains: bool = True, mlp_trains: bool = True,
                               norms_train: bool = True) -> int:
    """Bytes one block saves for backward per token (the family's cost model, model/build.py).

    Args:
        s: the model's shape.
        compute: bytes per element of matmul outputs (autocast dtype; 4 in fp32).
        residual: bytes per element of the residual stream (the parameters' dtype: 4, or 2 under bf16-pure).
        tp: tensor-parallel degree (splits heads and the MLP width).
        sp: sequence parallel (also splits the norms' saved tensors).
        dropout: dropout > 0 (one byte of mask per element at each residual dropout).
        attn_trains, mlp_trains, norms_train: which of the block's weights train (model.cost.Bytes).
    """
    from effitrain.model import GROUP as MODEL
    from effitrain.model.build import Bytes

    split = 1 / tp
    saved = Bytes(compute=compute, residual=residual, split=split, norm_split=split if sp else 1.0,
                  attn_trains=attn_trains, mlp_trains=mlp_trains, norms_train=norms_train)
    masks = 2 * s.hidden if dropout else 0
    return int(MODEL.cost_of(s.family).block(s, saved) + masks)


def head_bytes_per_token(s: Shape, *, compute: int, residual: int, tp: int, head_trains: bool = True,
                         final_norm_trains: bool = True) -> dict[str, int]:
    """Saved tensors of the final norm and head input, and the loss's largest backward moment (per token).

    Cross entropy (fp32 under autocast) saves the log-softmax output; its backward holds that output, the
    gradient from nll_loss and the gradient it produces at once: three fp32 vocab-wide tensors. Under TP the
    vocab-sharded logits are gathered for the loss."""
    from effitrain.model import GROUP as MODEL

    v = s.vocab
    # a frozen RMSNorm weight saves no normalised tensor (model/build.py)
    normalised = residual if final_norm_trains or MODEL.cost_of(s.family).final_norm_saves_frozen else 0
    saved = (4 + normalised) * s.hidden + head_trains * (residual if residual == compute else compute) * s.hidden
    return {"final_norm_head_input": int(saved), "loss_backward": 3 * 4 * v + (compute * v // tp if tp > 1 else 0)}


def block_activations(s: Shape, *, per_layer: int, mode: str, every: int, residual: int) -> tuple[int, int]:
    """(saved bytes per token over all blocks, the transient of one block's recompute) by checkpointing mode."""
    if mode == "none":
        return s.layers * per_layer, 0
    checkpointed = s.layers if mode == "full" else math.ceil(s.layers / every)
    kept = residual * s.hidden  # a checkpointed block keeps only its input
    return checkpointed * kept + (s.layers - checkpointed) * per_layer, per_layer


# ---------------------------------------------------------------- the estimate


def estimate(cfg, *, mfu: float | None = None, gpu: str | None = None, shape: Shape | None = None,
             timing: bool = True) -> Estimate:
    """Per-rank memory, FLOPs per token and step, and predicted time of a composed config.

    Args:
        cfg: the composed config (compose.compose_one), the same `effitrain train` would run.
        mfu: model FLOPs utilisation to predict time at; None = the newest matching run's median, else an assumption.
        gpu: a GPU name (h100, a100...) whose datasheet peak the time is predicted at; None = this machine's device
            (cfg.device; auto = CUDA if present): the table for a known GPU, else a measured peak (flops.py).
        shape: a model shape already built (tests reuse one).
        timing: predict time (False: memory and FLOPs only, no peak FLOP/s needed).
    """
    from effitrain.launcher import world_size
    from effitrain.optimizer import GROUP as OPTIMIZER
    from effitrain.optimizer.build import temporaries

    ws = world_size(cfg.launcher)
    d = parallel_degrees(cfg.parallel, world_size=ws)
    s = shape or model_shape(cfg.model, vocab=vocab_size(run_data_config(cfg)), seq_len=cfg.data.seq_len,
                             compression=cfg.compression)
    precision = precision_spec(cfg.precision)
    layout = PARALLEL.cost_of(cfg.parallel.strategy)(cfg.parallel)
    if PARALLEL.provides(cfg.parallel, PIPELINE):
        return _pipeline_estimate(cfg, s, d=d, ws=ws, layout=layout, mfu=mfu, gpu=gpu, timing=timing)
    fsdp = layout.shards
    p_bytes = precision.bytes("param")
    compute = precision.bytes("compute")
    notes: list[str] = []

    numels = [layout.local_numel(p, d) for p in s.params]
    n_local = sum(numels)
    trained = [(p, n) for p, n in zip(s.params, numels, strict=True) if p.trainable]
    n_trained = sum(n for _, n in trained)
    mem: dict[str, int] = {"parameters": n_local * p_bytes, "gradients": n_trained * p_bytes}
    # moments are kept in the parameters' dtype: fp32, or bf16 under bf16-pure (torchao's AdamW)
    mem["optimizer_state"] = OPTIMIZER.cost_of(cfg.optimizer.kind).state(
        cfg.optimizer, [p for p, _ in trained], [n for _, n in trained], state_bytes=p_bytes, dp=d.dp)
    tokens = cfg.batch_size * cfg.data.seq_len  # per micro-step and rank
    compression = _compression_terms(s, numels, trained=n_trained, param_bytes=p_bytes,
                                     shard=d.dp_shard if fsdp else 1, tokens=tokens)
    mem |= compression.memory
    if offloads(cfg.parallel):
        notes.append("parallel.offload=cpu: parameters, gradients and optimizer state live in host memory; "
                     "the device holds the gathered parameters and activations")

    # FSDP's MixedPrecisionPolicy computes with bf16/fp16 parameters, so the residual stream is in that dtype too
    residual = compute if fsdp and precision.autocast else p_bytes
    trains = _what_trains(s)
    per_layer = activation_bytes_per_token(s, compute=compute, residual=residual, tp=d.tp,
                                           sp=bool(getattr(cfg.parallel, "sequence_parallel", False)),
                                           dropout=cfg.model.dropout > 0, attn_trains=trains["attn"],
                                           mlp_trains=trains["mlp"], norms_train=trains["norms"])
    # blocks before the first trained parameter (freeze with frozen embeddings) save nothing: no gradient passes
    saving = replace(s, layers=s.layers - trains["untouched_blocks"])
    saved, recompute = block_activations(saving, per_layer=per_layer, mode=cfg.parallel.activation_checkpointing,
                                         every=cfg.parallel.ac_every, residual=residual)
    head = head_bytes_per_token(s, compute=compute, residual=residual, tp=d.tp, head_trains=trains["head"],
                                final_norm_trains=trains["final_norm"])
    mem["activations"] = (saved + head["final_norm_head_input"]) * tokens
    mem["activation_recompute"] = recompute * tokens
    mem["logits_and_loss"] = head["loss_backward"] * tokens
    mem |= layout.memory(s, d=d, spec=precision, n_trained=n_trained)  # DDP's buckets, FSDP's gathered parameters

    # the head's (tied) weight gradient appears at the start of backward, before the gradients of the blocks
    # (under FSDP it is the root's unsharded gradient, counted above)
    head_grad = 0 if fsdp else sum(n for p, n in zip(s.params, numels, strict=True)
                                   if p.kind in ("embedding", "head") and p.trainable) * p_bytes

    # the loss is computed after the model's forward returned: with reshard_after_forward (effitrain sets it on the
    # root too) nothing is gathered then, nor when backward starts at the loss, until the head's backward
    at_loss = mem["fsdp_gathered_params"] if fsdp and not cfg.parallel.reshard_after_forward else 0
    static = mem["parameters"] + mem["optimizer_state"] + mem.get("ddp_buckets", 0) + compression.bytes("held")
    if offloads(cfg.parallel):
        static = 0
    gathered_now = mem.get("fsdp_gathered_params", 0) + mem.get("fsdp_unsharded_grads", 0)
    backward = static + mem["activations"] + mem["logits_and_loss"] + compression.bytes("at_backward") + at_loss \
        + head_grad
    recompute_moment = static + mem["activations"] + mem["activation_recompute"] + gathered_now \
        + mem.get("fsdp_block_reduce", 0) + head_grad
    # the first block's backward, the last of the pass: the later blocks' gradients exist by then (sharded under
    # FSDP) and only the first block's activations are left
    first_block = static + _first_block_activations(saving, per_layer, cfg.parallel.activation_checkpointing,
                                                    residual) * tokens + mem["activation_recompute"] \
        + _later_block_grads(s, numels, p_bytes) + gathered_now + mem.get("fsdp_block_reduce", 0) + head_grad
    mem["optimizer_temporaries"] = temporaries(cfg.optimizer, n_trained, cpu=(gpu or _device(cfg)) == "cpu")
    step = static + mem["gradients"] + mem["optimizer_temporaries"]
    if offloads(cfg.parallel):
        step = 0
    moments = {"backward start": backward, "backward recompute": recompute_moment, "backward, first block": first_block,
               "optimizer step": step}
    moments |= compression.moments(mem, Step(static=static, activations=mem["activations"], at_loss=at_loss))
    phase = max(moments, key=moments.get)
    biggest = _biggest(mem, phase=phase, compression=compression)
    return _assemble(cfg, s, d=d, ws=ws, mem=mem, moments=moments, phase=phase, biggest=biggest,
                     per_layer_bytes=per_layer * tokens, notes=notes, mfu=mfu, gpu=gpu, timing=timing)


def _pipeline_estimate(cfg, s: Shape, *, d, ws: int, layout, mfu, gpu, timing) -> Estimate:
    """A pipeline layout's estimate: the memory of its worst rank (the one that runs out first) by the layout's own
    cost model (parallel/pipeline_cost.py), the rank named in a note."""
    ranks = pipeline_ranks(cfg, shape=s, gpu=gpu)
    peaks = [max(r["moments"].values()) for r in ranks]
    worst = max(range(len(ranks)), key=peaks.__getitem__)
    mem, moments = ranks[worst]["memory"], ranks[worst]["moments"]
    phase = max(moments, key=moments.get)
    live = {"optimizer step": ("parameters", "optimizer_state", "gradients", "optimizer_temporaries", "stage_outputs",
                               "pipeline_buffers", "input_grads")}
    candidates = live.get(phase, ("parameters", "optimizer_state", "activations", "stage_outputs", "pipeline_buffers",
                                  "input_grads", "fsdp_gathered_params"))
    biggest = max((k for k in candidates if k in mem), key=mem.get)
    notes = [f"pipeline rank {worst} of {d.pp} has the largest peak (per rank, MiB: "
             f"{', '.join(f'{p / 2**20:.1f}' for p in peaks)}); its microbatches in flight follow the "
             f"{cfg.parallel.schedule} schedule's action list"]
    tokens = -(-cfg.batch_size // cfg.parallel.microbatches) * cfg.data.seq_len  # one microbatch's
    return _assemble(cfg, s, d=d, ws=ws, mem=mem, moments=moments, phase=phase, biggest=biggest,
                     per_layer_bytes=ranks[worst]["per_layer"] * tokens, notes=notes, mfu=mfu, gpu=gpu, timing=timing)


def pipeline_ranks(cfg, *, shape: Shape | None = None, gpu: str | None = None) -> list[dict]:
    """Every pipeline rank's memory items and moments (bytes) under a pipeline layout (parallel/pipeline_cost.py),
    with what it needs from the other groups' cost models: the optimizer's state and temporaries, the family's saved
    activations per block and token, and the head's; "per_layer" added to each rank."""
    from effitrain.launcher import world_size
    from effitrain.optimizer import GROUP as OPTIMIZER
    from effitrain.optimizer.build import temporaries

    d = parallel_degrees(cfg.parallel, world_size=world_size(cfg.launcher))
    s = shape or model_shape(cfg.model, vocab=vocab_size(run_data_config(cfg)), seq_len=cfg.data.seq_len,
                             compression=cfg.compression)
    cpu = (gpu or _device(cfg)) == "cpu"

    def optimizer(params: list[Param], numels: list[int]) -> tuple[int, int]:
        state = OPTIMIZER.cost_of(cfg.optimizer.kind).state(cfg.optimizer, params, numels, state_bytes=4, dp=d.dp)
        return state, temporaries(cfg.optimizer, sum(numels), cpu=cpu)

    # pipelines run fp32 only and without TP (parallel._check_pipeline_options): 4-byte activations, nothing split
    per_layer = activation_bytes_per_token(s, compute=4, residual=4, tp=1, sp=False, dropout=cfg.model.dropout > 0)
    head = head_bytes_per_token(s, compute=4, residual=4, tp=1)["final_norm_head_input"]
    layout = PARALLEL.cost_of(cfg.parallel.strategy)(cfg.parallel)
    ranks = layout.ranks(s, cfg=cfg, d=d, per_layer=per_layer, head_input=head, optimizer=optimizer)
    return [r | {"per_layer": per_layer} for r in ranks]


def _assemble(cfg, s: Shape, *, d, ws: int, mem: dict, moments: dict, phase: str, biggest: str,
              per_layer_bytes: int, notes: list[str], mfu, gpu, timing) -> Estimate:
    """The Estimate from the memory items and moments of the reported rank: FLOPs per step and predicted time."""
    tokens = cfg.batch_size * cfg.data.seq_len
    tokens_step = tokens * d.dp * cfg.grad_accum_steps
    flops_step = s.flops_per_token * tokens * d.dp * cfg.grad_accum_steps
    if cfg.parallel.activation_checkpointing != "none":
        notes.append("activation checkpointing recomputes the checkpointed blocks' forward (~1/3 more compute); "
                     "model FLOPs and MFU do not count it, so the predicted time assumes the same MFU")
    peak, peak_source, mfu_used, mfu_source, step_time, tps = _timing(cfg, flops_step, tokens_step, ws=ws, mfu=mfu,
                                                                      gpu=gpu, timing=timing)
    return Estimate(config={"model": cfg.model.name, "precision": cfg.precision.name, "parallel": cfg.parallel.name,
                            "optimizer": cfg.optimizer.name, "batch_size": cfg.batch_size,
                            "seq_len": cfg.data.seq_len, "grad_accum_steps": cfg.grad_accum_steps,
                            "activation_checkpointing": cfg.parallel.activation_checkpointing, "world_size": ws,
                            "degrees": asdict(d)},
                    num_params=s.num_params, memory=mem, activations_per_layer=per_layer_bytes,
                    peak_bytes=int(moments[phase]), peak_phase=phase, biggest=biggest,
                    moments={k: int(v) for k, v in moments.items()},
                    flops_per_token=s.flops_per_token, flops_per_step=flops_step,
                    tokens_per_step=tokens_step, world_size=ws, mfu=mfu_used,
                    mfu_source=mfu_source, peak_flops_per_device=peak, peak_flops_source=peak_source,
                    step_time_s=step_time, tokens_per_s=tps, tokens_per_day=tps * 86400 if tps else None,
                    time_for_run_s=step_time * cfg.max_steps if step_time else None, notes=notes)


def _biggest(mem: dict[str, int], *, phase: str, compression) -> str:
    """The largest item live at the peak's moment (what the fit check names): the optimizer step holds model states,
    gradients and the update's temporaries; every other moment is inside forward/backward."""
    live = {"forward/backward": ["parameters", "optimizer_state", "ddp_buckets", "activations", "logits_and_loss",
                                 "fsdp_gathered_params", "fsdp_unsharded_grads", "fsdp_block_reduce",
                                 "activation_recompute", *compression.transient, *compression.held],
            "optimizer step": ["parameters", "optimizer_state", "ddp_buckets", "gradients", "optimizer_temporaries",
                               *compression.held]}
    candidates = live["optimizer step" if phase == "optimizer step" else "forward/backward"]
    return max((k for k in candidates if k in mem), key=mem.get)


def _timing(cfg, flops_step: float, tokens_step: int, *, ws: int, mfu: float | None, gpu: str | None,
            timing: bool) -> tuple:
    """(peak FLOP/s per device, its source, MFU used, its source, seconds per step, tokens/s); None where the peak
    is undefined or timing was not asked."""
    if not timing:
        return None, "not asked", math.nan, "not asked", None, None
    peak, peak_source = _peak_flops(cfg, gpu)
    mfu_used, mfu_source = _mfu(cfg, mfu, gpu)
    if not peak:
        return peak, peak_source, mfu_used, mfu_source, None, None
    step_time = flops_step / (mfu_used * peak * ws)
    return peak, peak_source, mfu_used, mfu_source, step_time, tokens_step / step_time


def _first_block_activations(s: Shape, per_layer: int, mode: str, residual: int) -> int:
    """Bytes per token the first block still holds at its backward: its input when checkpointed (every mode but
    none checkpoints block 0), else everything it saved; nothing when no gradient passes through it."""
    if s.layers == 0:
        return 0
    return per_layer if mode == "none" else residual * s.hidden


def _later_block_grads(s: Shape, numels: list[int], p_bytes: int) -> int:
    """Gradient bytes of the trained parameters of blocks 1.. on this rank (sharded under FSDP)."""
    return sum(n for p, n in zip(s.params, numels, strict=True)
               if p.trainable and (_block_of(p.name) or 0) > 0) * p_bytes


def _what_trains(s: Shape) -> dict:
    """Which parts of the model have a trained parameter (LoRA adapters count for the Linear they adapt), and how
    many leading blocks have none with nothing trained before them."""
    def block(p: Param) -> int | None:
        return _block_of(p.name)

    trained = [p for p in s.params if p.trainable]
    from effitrain.model import GROUP as MODEL

    attn = MODEL.cost_of(s.family).attention_inputs
    first = min((b if (b := block(p)) is not None else (-1 if p.kind in ("embedding", "position") else s.layers))
                for p in trained) if trained else s.layers
    return {"attn": any(block(p) is not None and any(f".{a}." in p.name for a in attn) for p in trained),
            "mlp": any(block(p) is not None and ".mlp." in p.name for p in trained),
            "head": any(p.kind == "head" or (s.tied and p.kind == "embedding") for p in trained),
            "norms": any(block(p) is not None and p.kind == "norm" for p in trained),
            "final_norm": any(block(p) is None and p.kind == "norm" for p in trained),
            "untouched_blocks": max(first, 0)}


@dataclass
class CompressionTerms:
    """The chosen compression methods' memory items per rank and where in the step they live (their cost models,
    compression/method.py)."""

    methods: list[tuple]  # (node, cost model, Inputs) of each, in the order they apply
    memory: dict[str, int] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)  # held through the whole step
    transient: list[str] = field(default_factory=list)  # live in forward/backward only
    at_backward: list[str] = field(default_factory=list)  # live from the loss to the end of backward

    def bytes(self, which: str) -> int:
        """The bytes of the items `held` or `at_backward`."""
        return sum(self.memory[k] for k in getattr(self, which))

    def moments(self, mem: dict[str, int], step: Step) -> dict[str, int]:
        """The moments of the step the methods add (building the distillation loss)."""
        return {k: v for node, cost, inputs in self.methods if cost.moments is not None
                for k, v in cost.moments(mem, inputs, step).items()}


def _compression_terms(s: Shape, numels: list[int], *, trained: int, param_bytes: int, shard: int,
                       tokens: int) -> CompressionTerms:
    terms = CompressionTerms([(node, cost, Inputs(params=s.params, numels=numels, trained=trained,
                                                  param_bytes=param_bytes, shard=shard, vocab=s.vocab, tokens=tokens,
                                                  read=read))
                              for node, cost, read in s.compression])
    for node, cost, inputs in terms.methods:
        items = cost.memory(node, inputs) if cost.memory is not None else {}
        terms.memory |= items
        terms.held += [k for k in items if k in cost.held]
        terms.transient += [k for k in items if k not in cost.held]
        terms.at_backward += [k for k in items if k in cost.backward]
    return terms


def _device(cfg) -> str:
    """Where the run trains: cfg.device, auto = CUDA when a driver is present."""
    if cfg.device != "auto":
        return cfg.device
    from pathlib import Path

    return "cuda" if Path("/proc/driver/nvidia/version").exists() else "cpu"


def _peak_flops(cfg, gpu: str | None) -> tuple[float | None, str]:
    """Peak FLOP/s per device: the datasheet table for a named GPU, else this machine's (table or measured)."""
    from effitrain.base.flops import table_peak

    where = gpu or _device(cfg)
    precision = precision_spec(cfg.precision)
    dtype = precision.peak_on(cuda=where != "cpu")
    if dtype == "float8":
        return None, "undefined (fp8 mixes fp8 and bf16 matmuls)"
    if where not in ("cpu", "cuda"):  # a GPU named by --gpu
        peak = table_peak(where.upper(), dtype)
        if peak is None:
            raise UsageError(f"--gpu {where}: no datasheet peak for {dtype} (known: H200, H100, A100, L4, V100)")
        return peak, f"table ({where.upper()})"
    import torch

    from effitrain.base.flops import peak_flops

    dev = torch.device("cuda" if where == "cuda" and torch.cuda.is_available() else "cpu")
    autocast = getattr(torch, precision.autocast) if precision.autocast else None
    return peak_flops(dev, dtype=dtype, autocast_dtype=autocast)


def _mfu(cfg, mfu: float | None, gpu: str | None) -> tuple[float, str]:
    if mfu is not None:
        return mfu, "given (--mfu)"
    run = newest_matching_run(cfg)
    if run is not None:
        return run[1] / 100, f"median of {run[0]}"
    if (gpu or _device(cfg)) == "cpu":
        return CPU_DEFAULT_MFU, f"assumed {CPU_DEFAULT_MFU:.0%} (no matching run under outputs/; set --mfu)"
    return DEFAULT_MFU, f"assumed {DEFAULT_MFU:.0%} (no matching run under outputs/; set --mfu)"


MATCH_KEYS = ("model", "precision", "parallel", "optimizer", "batch_size", "data.seq_len", "grad_accum_steps",
              "launcher.nproc_per_node", "launcher.nnodes")


def newest_matching_run(cfg, outputs: str = "outputs") -> tuple[str, float] | None:
    """(run directory, median MFU %) of the newest finished run under `outputs` with the same model, precision,
    layout, optimizer, batch, sequence and world size; None if there is none."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from effitrain.received import saved_config
    from effitrain.runs import read_summary

    want = {k: OmegaConf.to_container(OmegaConf.select(cfg, k)) if OmegaConf.is_config(OmegaConf.select(cfg, k))
            else OmegaConf.select(cfg, k) for k in MATCH_KEYS}
    runs = sorted(Path(outputs).glob("**/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for summary in runs:
        saved = summary.parent / ".hydra" / "config.yaml"
        if not saved.is_file():
            continue
        try:
            got = OmegaConf.create(saved_config(saved))  # a run someone sent may sit in outputs/ too: no resolver
            if all(_plain(OmegaConf.select(got, k)) == want[k] for k in MATCH_KEYS):
                value = read_summary(summary.parent).get("median_mfu_pct")
                if value:
                    return str(summary.parent), float(value)
        except Exception:  # an unreadable or foreign run directory is not a match
            continue
    return None


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


# ---------------------------------------------------------------- fit check and largest batch


def fit_verdict(est: Estimate, *, free_bytes: int) -> str | None:
    """None when the estimated peak fits in `free_bytes`; else one line naming the biggest item and the fix."""
    if est.peak_bytes <= free_bytes:
        return None
    fixes = {"activations": "parallel.activation_checkpointing=full, or a smaller batch_size",
             "activation_recompute": "a smaller batch_size (one block's activations are recomputed at a time)",
             "logits_and_loss": "a smaller batch_size or data.seq_len (with grad_accum_steps for the same batch)",
             "optimizer_state": "parallel=fsdp (shards it), optimizer=adamw-8bit, or parallel.offload=cpu",
             "parameters": "parallel=fsdp or precision=bf16-pure, or parallel.offload=cpu",
             "gradients": "parallel=fsdp (shards them) or precision=bf16-pure",
             "optimizer_temporaries": "optimizer.implementation=fused (no foreach temporaries)",
             "ddp_buckets": "parallel=fsdp (no full gradient buckets)",
             "fsdp_gathered_params": "parallel.reshard_after_forward=true, or more FSDP ranks",
             "fsdp_unsharded_grads": "more FSDP ranks",
             "fsdp_block_reduce": "more FSDP ranks",
             "stage_outputs": "more parallel.microbatches or a smaller batch_size (the last stage keeps every "
                              "microbatch's logits until the step ends)",
             "pipeline_buffers": "a smaller batch_size (one receive buffer per microbatch)",
             "input_grads": "a smaller batch_size"}
    return (f"the estimated peak {est.peak_bytes / GiB:.2f} GiB per rank exceeds the {free_bytes / GiB:.2f} GiB free "
            f"on the device; the biggest item is {est.biggest} ({est.memory[est.biggest] / GiB:.2f} GiB): "
            f"{fixes[est.biggest]} (effitrain estimate shows the breakdown)")


SKIP_FIT_CHECK_ENV = "EFFITRAIN_SKIP_FIT_CHECK"  # =1: start even when the estimate says it will not fit


def fit_check(cfg) -> None:
    """Before a CUDA run starts: the estimated peak per rank against the GPU's free memory; one line and exit 2
    (UsageError) when it cannot fit. CPU runs and EFFITRAIN_SKIP_FIT_CHECK=1 skip it."""
    import os

    if _device(cfg) != "cuda" or os.environ.get(SKIP_FIT_CHECK_ENV) == "1":
        return
    import torch

    if not torch.cuda.is_available():
        return  # the worker reports a missing GPU itself
    verdict = fit_verdict(estimate(cfg, timing=False), free_bytes=torch.cuda.mem_get_info()[0])
    if verdict is not None:
        raise UsageError(f"{verdict}; {SKIP_FIT_CHECK_ENV}=1 starts it anyway")


def max_batch(cfg, *, free_bytes: int, shape: Shape, limit: int = 1 << 16) -> int:
    """The largest batch_size whose estimated peak fits in free_bytes (0 if not even 1); the peak grows with
    the batch, so a doubling then a bisection finds it."""
    def fits(b: int) -> bool:
        cfg.batch_size = b
        return estimate(cfg, shape=shape, timing=False).peak_bytes <= free_bytes

    original = cfg.batch_size
    try:
        if not fits(1):
            return 0
        lo, hi = 1, 2
        while hi <= limit and fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
    finally:
        cfg.batch_size = original


# ---------------------------------------------------------------- console


def format_table(est: Estimate) -> str:
    c = est.config
    pp = f", pp {c['degrees']['pp']}" if c["degrees"]["pp"] > 1 else ""
    lines = [f"estimate: model {c['model']} ({est.num_params / 1e6:.2f}M parameters) | precision {c['precision']} | "
             f"parallel {c['parallel']} x{est.world_size} (dp {c['degrees']['dp_replicate'] * c['degrees']['dp_shard']}"
             f", tp {c['degrees']['tp']}{pp}) | optimizer {c['optimizer']} | batch {c['batch_size']} x seq "
             f"{c['seq_len']} x accum {c['grad_accum_steps']} | AC {c['activation_checkpointing']}",
             "", f"{'memory per rank':<28}{'MiB':>12}{'GiB':>10}"]
    for name, value in est.memory.items():
        lines.append(f"  {name:<26}{value / 2**20:>12.2f}{value / GiB:>10.3f}")
    lines.append(f"  {'(activations per layer)':<26}{est.activations_per_layer / 2**20:>12.2f}"
                 f"{est.activations_per_layer / GiB:>10.3f}")
    lines.append(f"{'peak (' + est.peak_phase + ')':<28}{est.peak_bytes / 2**20:>12.2f}{est.peak_bytes / GiB:>10.3f}"
                 f"   biggest item: {est.biggest}")
    lines += ["", f"FLOPs: {est.flops_per_token / 1e6:.2f} MFLOPs/token, {est.flops_per_step / 1e12:.4g} TFLOPs/step "
                  f"({est.tokens_per_step:,} tokens/step)"]
    if est.step_time_s is None:
        lines.append(f"time: undefined ({est.peak_flops_source})")
    else:
        lines.append(f"time at MFU {est.mfu:.1%} ({est.mfu_source}) of {est.peak_flops_per_device / 1e12:.2f} TFLOP/s "
                     f"per device ({est.peak_flops_source}): {est.step_time_s:.4g} s/step, "
                     f"{est.tokens_per_s:,.0f} tokens/s, {est.tokens_per_day / 1e9:.4g}B tokens/day, "
                     f"{est.time_for_run_s / 3600:.3g} h for max_steps")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)
