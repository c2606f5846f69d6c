"""The `model` group: causal LMs from transformers configs (family llama or gpt2), built locally, no download.

Schemas and checks here (no torch); builders in `effitrain.model.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("model", key="family", builders="effitrain.model.build")
PRETRAINED = "pretrained"  # trait: the model starts from a local checkpoint's trained weights
TP_PLAN = "tp_plan"  # trait: the family has a tensor-parallel plan for its blocks (parallel/build.py)


class ModelError(UsageError):
    """Bad model input: reported as one line, exit code 2."""


@dataclass
class ModelBase:
    name: str = "tiny"
    family: str = "llama"
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: Optional[int] = None  # MLP width; None = the family's default (4 x hidden_size)
    tie_embeddings: bool = True  # share input embedding and LM head weights
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    pretrained: Optional[str] = None  # local HF checkpoint directory; never downloads
    # model.pretrained under fsdp/hsdp/tp/fsdp-tp: each rank reads only its own shards of the safetensors files
    # (false: every rank loads the whole checkpoint first, as single and ddp do)
    load_shards: bool = True


@GROUP.option("llama")
@dataclass
class LlamaModel(ModelBase):
    family: str = "llama"
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = num_heads
    rope_theta: float = 10000.0


@GROUP.option("gpt2")
@dataclass
class GPT2Model(ModelBase):
    family: str = "gpt2"  # learned positions, GELU MLP, LayerNorm with biases


# checkpoint types whose blocks the hand-written llama/gpt2 tensor-parallel plans fit (parallel/build.py): separate
# q/k/v and gate/up projections, norms over one head or the whole hidden size. Others (phi3's fused qkv_proj, olmo2's
# q/k norms over the whole projection, MoE experts) are refused before launch until transformers' own
# base_model_tp_plan is used (issue 23).
HAND_TP_PLAN_TYPES = ("llama", "mistral", "qwen3", "gemma3_text", "gpt2")


def model_type(cfg) -> str:
    """What the model is: a model.pretrained checkpoint's config.json model_type, else the option's family."""
    if not cfg.pretrained:
        return cfg.family
    return check_hf_dir(Path(cfg.pretrained).expanduser(), what=f"model.pretrained={cfg.pretrained}")["model_type"]


def _provides(cfg, _run) -> list[str]:
    return [*([TP_PLAN] if model_type(cfg) in HAND_TP_PLAN_TYPES else []), *([PRETRAINED] if cfg.pretrained else [])]


GROUP.traits("llama", provides=_provides)
GROUP.traits("gpt2", provides=_provides)


# what transformers' from_pretrained reads weights from (single file or sharded index)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@GROUP.checks
def check(cfg) -> None:
    for key in ("hidden_size", "num_heads", "num_layers"):
        if cfg[key] <= 0:
            raise UsageError(f"model.{key}={cfg[key]} must be a positive integer")
    if cfg.intermediate_size is not None and cfg.intermediate_size <= 0:
        raise UsageError(f"model.intermediate_size={cfg.intermediate_size} must be a positive integer (or null: "
                         "the family's default, 4 x hidden_size)")
    if cfg.hidden_size % cfg.num_heads:
        raise UsageError(f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}")
    if cfg.family == "llama" and cfg.num_kv_heads is not None and cfg.num_kv_heads < 0:
        raise UsageError(f"model.num_kv_heads={cfg.num_kv_heads} must be a positive integer (or null: num_heads)")
    if cfg.family == "llama" and cfg.num_kv_heads and cfg.num_heads % cfg.num_kv_heads:
        raise UsageError(f"model.num_heads={cfg.num_heads} is not divisible by model.num_kv_heads={cfg.num_kv_heads}")
    if cfg.pretrained:
        check_hf_dir(Path(cfg.pretrained).expanduser(), what=f"model.pretrained={cfg.pretrained}")


@GROUP.check_of("llama")
@GROUP.check_of("gpt2")
def check_pretrained_vocab(cfg, run) -> None:
    """A model.pretrained checkpoint has an embedding row for every token of the run's tokenizer (data.tokenizer: by
    default its own tokenizer.json, data.run_data_config): found here, one line before any worker starts."""
    from effitrain.data import read_tokenizer, run_data_config, tokenizer_specials

    tokenizer = run_data_config(run).tokenizer
    if not (cfg.pretrained and tokenizer):
        return
    what = f"data.tokenizer={tokenizer}" if run.data.tokenizer else f"the tokenizer of model.pretrained ({tokenizer})"
    tok = read_tokenizer(Path(tokenizer).expanduser(), what=what)
    tokenizer_specials(Path(tokenizer).expanduser(), what=what, tok=tok)  # its EOS: one line when it has none
    embeddings = check_hf_dir(Path(cfg.pretrained).expanduser(), what=f"model.pretrained={cfg.pretrained}") \
        .get("vocab_size")
    if isinstance(embeddings, int) and tok.get_vocab_size() > embeddings:
        fix = "give the model's own tokenizer" if run.data.tokenizer else \
            "set data.tokenizer to the tokenizer the model was trained with"
        raise ModelError(f"model.pretrained={cfg.pretrained} has {embeddings} embeddings but {what} has "
                         f"{tok.get_vocab_size()} tokens: {fix} (effitrain adds no token to it)")


def check_hf_dir(path: Path, *, what: str) -> dict:
    """A local Hugging Face model directory that from_pretrained can read: a config.json that parses and a weights
    file; its config. Checked here, before any process starts, so a damaged one is one line and no run directory."""
    import json

    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{what}: no config.json there (give a local Hugging Face checkpoint dir)")
    try:
        parsed = json.loads(config.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ModelError(f"{what}: {config} is damaged ({e})") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelError(f"{what}: {config} has no model_type (not a transformers model config)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{what}: no weights file in {path} (expected one of: {', '.join(WEIGHT_FILES)})")
    return parsed


def kv_heads(cfg) -> int:
    """Key/value heads of the model (gpt2 has none of its own: every head has its k and v)."""
    return (cfg.num_kv_heads or cfg.num_heads) if cfg.family == "llama" else cfg.num_heads
