"""The `model` group: causal LMs from transformers configs (family llama or gpt2), built locally, no download.

Schemas and checks here (no torch); builders in `effitrain.models.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("model", key="family", builders="effitrain.models.build")


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


@GROUP.checks
def check(cfg) -> None:
    if cfg.hidden_size % cfg.num_heads:
        raise UsageError(f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}")
    if cfg.family == "llama" and cfg.num_kv_heads and cfg.num_heads % cfg.num_kv_heads:
        raise UsageError(f"model.num_heads={cfg.num_heads} is not divisible by model.num_kv_heads={cfg.num_kv_heads}")
    if cfg.pretrained and not (Path(cfg.pretrained).expanduser() / "config.json").is_file():
        raise UsageError(f"model.pretrained={cfg.pretrained}: no config.json there "
                         "(give a local Hugging Face checkpoint dir)")


def kv_heads(cfg) -> int:
    """Key/value heads of the model (gpt2 has none of its own: every head has its k and v)."""
    return (cfg.num_kv_heads or cfg.num_heads) if cfg.family == "llama" else cfg.num_heads
