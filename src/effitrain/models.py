"""Causal LMs from transformers configs, built locally: no hub download, ever."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from effitrain.errors import UsageError


class ModelError(UsageError):
    """Bad model input: reported as one line, exit code 2."""


def hf_config(cfg, *, vocab_size: int, max_seq_len: int):
    """The transformers config for the `model` group (llama or gpt2 family)."""
    if cfg.family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                           num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
                           intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size, vocab_size=vocab_size,
                           max_position_embeddings=max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                           rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, attention_dropout=cfg.dropout,
                           initializer_range=cfg.init_std, use_cache=False)
    if cfg.family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                          n_inner=cfg.intermediate_size, vocab_size=vocab_size, n_positions=max_seq_len,
                          tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                          attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
                          use_cache=False)
    raise ModelError(f"model.family={cfg.family!r} is not one of: llama, gpt2")


def build_model(cfg, *, vocab_size: int, max_seq_len: int) -> nn.Module:
    """A freshly initialised causal LM on the CPU (call under the run's seed), or a local checkpoint.

    Args:
        cfg: the `model` config group.
        vocab_size: the tokenizer's vocabulary size.
        max_seq_len: the longest sequence the run feeds.
    """
    from transformers import AutoModelForCausalLM

    if cfg.pretrained:
        path = Path(cfg.pretrained).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"model.pretrained={cfg.pretrained}: no config.json (give a local HF checkpoint dir)")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa",
                                                     dtype=torch.float32)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ModelError(f"model.pretrained has {model.get_input_embeddings().num_embeddings} embeddings "
                             f"but the tokenizer has {vocab_size} tokens (set data.tokenizer to its tokenizer.json)")
        return model
    return AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size=vocab_size, max_seq_len=max_seq_len),
                                            attn_implementation="sdpa", dtype=torch.float32)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks (the unit for FSDP wrapping, checkpointing and compile)."""
    inner = model.base_model
    return inner.layers if hasattr(inner, "layers") else inner.h


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
