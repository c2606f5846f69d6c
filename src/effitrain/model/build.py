"""Builders of the `model` group: causal LMs from transformers configs, built locally (no hub download, ever)."""

from __future__ import annotations

import math
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from effitrain.model import GROUP, ModelError, check_hf_dir


def hf_config(cfg, *, vocab_size: int, max_seq_len: int):
    """The transformers config of the `model` group's family."""
    return GROUP.builder_of(cfg.family)(cfg, vocab_size=vocab_size, max_seq_len=max_seq_len)


@GROUP.builder("llama")
def llama_config(cfg, *, vocab_size: int, max_seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
                       intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size, vocab_size=vocab_size,
                       max_position_embeddings=max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                       rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, attention_dropout=cfg.dropout,
                       initializer_range=cfg.init_std, use_cache=False)


@GROUP.builder("gpt2")
def gpt2_config(cfg, *, vocab_size: int, max_seq_len: int):
    from transformers import GPT2Config

    return GPT2Config(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                      n_inner=cfg.intermediate_size, vocab_size=vocab_size, n_positions=max_seq_len,
                      tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                      attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
                      use_cache=False)


def build_model(cfg, *, vocab_size: int, max_seq_len: int, meta: bool = False, shards: bool = False) -> nn.Module:
    """A causal LM from its config (on the CPU, or with its parameters on the meta device), or a local checkpoint.

    Args:
        cfg: the `model` config group.
        vocab_size: the tokenizer's vocabulary size.
        max_seq_len: the longest sequence the run feeds.
        meta: put the parameters on the meta device (no memory); buffers such as rotary frequencies stay real.
            Materialise them after sharding and fill them with `init_weights`. Ignored for a pretrained checkpoint.
        shards: a pretrained checkpoint's architecture only, on the meta device (no weight read): after sharding,
            model.load.SlicedLoad fills each rank's shards from the safetensors files.
    """
    from transformers import AutoModelForCausalLM

    if cfg.pretrained:
        path, what = Path(cfg.pretrained).expanduser(), f"model.pretrained={cfg.pretrained}"
        model = architecture_on_meta(path, what=what) if shards else load_pretrained(path, what=what,
                                                                                        dtype=torch.float32)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ModelError(f"model.pretrained has {model.get_input_embeddings().num_embeddings} embeddings "
                             f"but the tokenizer has {vocab_size} tokens (set data.tokenizer to its tokenizer.json)")
        # training feeds whole sequences: a KV cache (a checkpoint's config usually asks for one) only grows, and a
        # block that activation checkpointing recomputes in backward would append its keys to it a second time
        model.config.use_cache = False
    else:
        with _parameters_on_meta() if meta else nullcontext():
            model = AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size=vocab_size, max_seq_len=max_seq_len),
                                                     attn_implementation="sdpa", dtype=torch.float32)
    if model.config.model_type == "gpt2":
        linearise_gpt2(model)
    return model


def pretrained_on_meta(path) -> nn.Module:
    """A local checkpoint's architecture from its config.json alone, parameters on the meta device (no weight is
    read): what `effitrain estimate` needs of a model.pretrained or a distillation teacher."""
    path = Path(path).expanduser()
    model = architecture_on_meta(path, what=str(path))
    if model.config.model_type == "gpt2":
        linearise_gpt2(model)
    return model


def architecture_on_meta(path: Path, *, what: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The checkpoint's model as its config.json describes it, parameters on the meta device in `dtype`, buffers
    computed (as from_pretrained computes them for that dtype); gpt2 not linearised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_hf_dir(path, what=what)
    with _read_as_model_error(path, what=what):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def load_pretrained(path: Path, *, what: str, dtype: torch.dtype) -> nn.Module:
    """A local Hugging Face model directory's causal LM (never downloads, never runs the directory's code); a damaged
    config or weights file is one ModelError line naming `what`, not a transformers traceback."""
    from transformers import AutoModelForCausalLM

    check_hf_dir(path, what=what)
    with _read_as_model_error(path, what=what):
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa",
                                                    dtype=dtype)


# what transformers and safetensors raise on a damaged or incomplete model directory (SafetensorError is neither)
def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return OSError, ValueError, KeyError, TypeError, SafetensorError


@contextmanager
def _read_as_model_error(path: Path, *, what: str):
    from effitrain.errors import first_line, io_failure

    try:
        yield
    except _load_errors() as e:
        if isinstance(e, OSError) and e.errno is not None:  # the disk, not the directory's content: an I/O failure
            raise io_failure(e, doing=f"reading {what}") from None
        raise ModelError(f"{what}: cannot load the model in {path} ({first_line(e)})") from None


class QKV(nn.Module):
    """GPT-2's fused `c_attn` as three Linears whose outputs are concatenated: [q | k | v], as the fused one.

    Separate weights let tensor parallelism shard each projection column-wise on its own (whole heads of q, k
    and v per rank); a column shard of the fused weight would give rank 0 all of q and part of k.
    """

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def linearise_gpt2(model: nn.Module) -> None:
    """Replace every transformers `Conv1D` of a GPT-2 by an equivalent `nn.Linear`, and each fused `c_attn` by `QKV`.

    Conv1D computes x @ W + b with W stored [in, out]; a Linear stores W^T, so the values are transposed
    (a checkpoint's weights keep their function). Done for every layout, so parameter names and shapes, hence the
    seeded init, are the same in single and TP runs. Meta parameters stay on the meta device.
    """
    from transformers.pytorch_utils import Conv1D

    for block in transformer_blocks(model):
        attn, d = block.attn, block.attn.embed_dim
        weight, bias = attn.c_attn.weight, attn.c_attn.bias  # [d, 3d] and [3d]: q, k, v along the output dim
        attn.c_attn = QKV(*(_linear(weight[:, i * d:(i + 1) * d], bias[i * d:(i + 1) * d]) for i in range(3)))
        for parent in (attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    setattr(parent, name, _linear(child.weight, child.bias))


def transformers_state_dict(model: nn.Module) -> dict:
    """The model's weights under transformers' own names and layout: GPT-2's Linears back to Conv1D ([in, out])
    and each QKV back to one fused c_attn; other families are already in it."""
    state = model.state_dict()
    if model.config.model_type != "gpt2":
        return state
    out = {}
    for name, value in state.items():
        if ".attn.c_attn." in name:
            prefix, proj, kind = name.rsplit(".", 2)  # ...c_attn, q_proj|k_proj|v_proj, weight|bias
            if proj != "q_proj":
                continue
            parts = [state[f"{prefix}.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{prefix}.{kind}"] = torch.cat([p.t() for p in parts], dim=1) if kind == "weight" else torch.cat(parts)
        elif name.endswith(".weight") and any(f".{m}.c_" in name for m in ("attn", "mlp")) and value.dim() == 2:
            out[name] = value.t().contiguous()  # a Linear made from a Conv1D
        else:
            out[name] = value
    return out


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """The Linear computing x @ weight + bias (weight [in, out], as in Conv1D), on weight's device and dtype."""
    linear = nn.Linear(*weight.shape, device=weight.device, dtype=weight.dtype)
    if not weight.is_meta:
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            linear.bias.copy_(bias)
    return linear


@contextmanager
def _parameters_on_meta():
    """Every parameter registered inside goes to the meta device; buffers do not. Buffers are tiny and some
    (rotary inv_freq) are computed at construction and never saved, so they must stay real."""
    register = nn.Module.register_parameter

    def to_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def init_weights(model: nn.Module, *, cfg, seed: int) -> None:
    """Fill the (possibly sharded) parameters with a layout-independent deterministic init.

    Each parameter's full value comes from its own generator, seeded by (seed, parameter name), and each
    rank keeps only its own shard of it: single, DDP, FSDP and TP runs start from identical weights, and
    no rank ever holds more than one full parameter at a time. The rule is the families' usual one:
    matrices N(0, init_std) (GPT-2 output projections scaled by 1/sqrt(2 x layers)), biases 0, norm weights 1.

    Args:
        model: the model, its parameters materialised (plain tensors or DTensors).
        cfg: the `model` config group (init_std, family, num_layers).
        seed: the run's seed.
    """
    for name, param in model.named_parameters():
        name = canonical_name(name)
        with torch.no_grad():
            _fill(param, _initial_value(name, tuple(param.shape), cfg=cfg, seed=seed).to(param.dtype))


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers' infixes (activation checkpointing, torch.compile)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _initial_value(name: str, shape: tuple, *, cfg, seed: int) -> torch.Tensor:
    if len(shape) == 1:
        return torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)
    std = cfg.init_std
    if cfg.family == "gpt2" and name.endswith("c_proj.weight"):
        std /= math.sqrt(2 * cfg.num_layers)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def _fill(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full value into a parameter: the whole of it, or this rank's shard of a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same full value, so each slices its own shard (no communication)
        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full.to(param.device))


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks (the unit for FSDP wrapping, checkpointing and compile)."""
    inner = model.base_model
    return inner.layers if hasattr(inner, "layers") else inner.h


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- cost models (effitrain estimate)
# Cost models of the `model` group (torch-free): per family, the block dimensions read from a transformers config

FP32 = 4


@dataclass(frozen=True)
class Cost:
    """A family's block, as the memory model sees it.

    Args:
        dimensions: `transformers config -> {layers, hidden, heads, kv_heads, intermediate, tied}`.
        block: `(s, bytes) -> bytes one block saves per token` (see activation_bytes_per_token).
        attention_inputs: the names of the Linears that read the attention's input (a trained one saves it).
        final_norm_saves_frozen: the final norm saves its normalised output even when its weight is frozen.
    """

    dimensions: Callable[..., dict]
    block: Callable[..., float]
    attention_inputs: tuple[str, ...]
    final_norm_saves_frozen: bool


@dataclass(frozen=True)
class Bytes:
    """What a block's saved tensors weigh, per element, and which of its weights train.

    Args:
        compute: matmul outputs (the autocast dtype; 4 in fp32).
        residual: the residual stream (the parameters' dtype, or the autocast dtype under FSDP's policy).
        split: 1 / the tensor-parallel degree (heads and the MLP width are split).
        norm_split: `split` under sequence parallel (the norms' saved tensors split too), else 1.
        attn_trains, mlp_trains, norms_train: a weight of the attention's input projections / of the MLP / the
            blocks' norms trains (LoRA adapters count). A frozen Linear saves no input (its input gradient needs
            the weight only); a frozen RMSNorm weight saves no normalised tensor.
    """

    compute: int
    residual: int
    split: float
    norm_split: float
    attn_trains: bool = True
    mlp_trains: bool = True
    norms_train: bool = True

    def linear_inputs(self, consumers: int, source: int, hidden: int) -> float:
        """A Linear saves its input; under autocast each Linear casts an fp32 input itself (a copy per consumer)."""
        return source * hidden if source == self.compute else consumers * self.compute * hidden


def _decoder_dimensions(config) -> dict:
    """llama and every llama-like transformers decoder a model.pretrained checkpoint can be (qwen3, mistral, gemma3,
    phi3, olmo2, qwen3-moe, mixtral...): its widths, and in `detail` what its block adds to llama's."""
    heads = config.num_attention_heads
    experts = next((getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(config, k, None)), 0)
    block_norms = sum(1 for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                     "post_feedforward_layernorm") if name in _BLOCK_NORMS.get(config.model_type,
                                                                                                _LLAMA_NORMS))
    detail = {"model_type": config.model_type, "head_dim": getattr(config, "head_dim", None) or config.hidden_size
              // heads, "qk_norm": config.model_type in _QK_NORMS, "norms": block_norms, "experts": experts,
              "top_k": getattr(config, "num_experts_per_tok", 0) if experts else 0,
              "moe_intermediate": getattr(config, "moe_intermediate_size", None) or config.intermediate_size}
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "intermediate": config.intermediate_size, "tied": bool(config.tie_word_embeddings), "detail": detail}


_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_BLOCK_NORMS = {"gemma3_text": (*_LLAMA_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm"),
                "gemma2": (*_LLAMA_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm"),
                "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm")}
_QK_NORMS = ("qwen3", "qwen3_moe", "gemma3_text", "olmo2")  # norms over q and k before attention


def _gpt2_dimensions(config) -> dict:
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
            "kv_heads": config.num_attention_heads, "intermediate": config.n_inner or 4 * config.hidden_size,
            "tied": bool(config.tie_word_embeddings), "detail": {"model_type": "gpt2"}}


def _decoder_block(s, b: Bytes) -> float:
    """A llama-like block: its norms (two; gemma3 four), attention with q heads x head_dim and k/v kv_heads x head_dim
    wide (q/k norms where the family has them), and a gated MLP -- or a MoE MLP: the router's fp32 logits and
    probabilities, and per token the top_k experts it visits (its input gathered and its weighted output, each once
    per visit, and the expert's gated MLP)."""
    d = s.detail
    h, a = s.hidden, s.heads
    q, kv = a * d["head_dim"], s.kv_heads * d["head_dim"]
    norm = FP32 * h + b.norms_train * b.residual * h  # RMSNorm: its input (or fp32 copy) and the normalised tensor
    norm_out = b.residual  # weight * normalised, in the residual dtype
    qk_norms = d["qk_norm"] * b.split * (FP32 + b.compute) * (q + kv)
    attn = (b.attn_trains * b.linear_inputs(3, norm_out, h)
            + b.split * (b.compute * (2 * q + 2 * kv) + b.compute * q + FP32 * a) + qk_norms)
    inter = d["top_k"] * d["moe_intermediate"] if d["experts"] else s.intermediate
    dispatch = (2 * d["top_k"] * b.compute * h + 2 * FP32 * d["experts"]) if d["experts"] else 0
    # gate (silu input), silu out, up, and their product (down_proj's input)
    mlp = (b.mlp_trains * (b.linear_inputs(2, norm_out, h) + b.split * b.compute * inter)
           + b.split * 3 * b.compute * inter + dispatch)
    return b.norm_split * d["norms"] * norm + attn + mlp


def _gpt2_block(s, b: Bytes) -> float:
    """LayerNorm runs in fp32 under autocast and saves its input; gelu_new (tanh form) saves four tensors."""
    h, inter, a = s.hidden, s.intermediate, s.heads
    norm = FP32 * h
    norm_out = FP32
    attn = (b.attn_trains * b.linear_inputs(3, norm_out, h)
            + b.split * (b.compute * 3 * h + b.compute * h + b.compute * h + FP32 * a))
    mlp = (b.mlp_trains * (b.linear_inputs(1, norm_out, h) + b.split * b.compute * inter)
           + b.split * 4 * b.compute * inter)
    return b.norm_split * 2 * norm + attn + mlp


# llama's cost model counts every llama-like decoder (estimate.py: a checkpoint of any model_type but gpt2)
GROUP.cost("llama")(Cost(_decoder_dimensions, _decoder_block,
                         attention_inputs=("q_proj", "k_proj", "v_proj", "qkv_proj"), final_norm_saves_frozen=False))
GROUP.cost("gpt2")(Cost(_gpt2_dimensions, _gpt2_block, attention_inputs=("c_attn",), final_norm_saves_frozen=True))
