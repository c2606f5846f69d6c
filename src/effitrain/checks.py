"""Checks of a composed config that need no worker and no torch: run before any process starts.

Each check raises UsageError with one line: what is wrong and what would be right.
"""

from __future__ import annotations

from pathlib import Path

from effitrain.errors import UsageError

_DTYPES = ("float32", "bfloat16", "float16")


def check_all(cfg) -> None:
    check_run(cfg)
    check_data(cfg.data)
    check_model(cfg.model)
    check_precision(cfg.precision)
    check_parallel(cfg.parallel, launcher=cfg.launcher)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def check_run(cfg) -> None:
    for key in ("max_steps", "batch_size", "grad_accum_steps", "eval_every", "eval_batches"):
        _need(cfg[key] > 0, f"{key}={cfg[key]} must be a positive integer")
    _need(cfg.grad_clip >= 0, f"grad_clip={cfg.grad_clip} must be >= 0 (0 measures the norm without clipping)")
    _need(cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r} is not one of: auto, cpu, cuda")
    _need(cfg.logging.every > 0, f"logging.every={cfg.logging.every} must be a positive integer")


def check_data(cfg) -> None:
    from effitrain.data.corpus import resolve_paths

    _need(cfg.source in ("stdlib", "text", "jsonl"), f"data.source={cfg.source!r} is not one of: stdlib, text, jsonl")
    _need(cfg.seq_len > 0, f"data.seq_len={cfg.seq_len} must be a positive integer")
    _need(0 < cfg.val_fraction < 1, f"data.val_fraction={cfg.val_fraction} must lie strictly between 0 and 1")
    _need(cfg.vocab_size >= 260,
          f"data.vocab_size={cfg.vocab_size} is too small: a byte-level BPE needs at least 260 (256 bytes + merges)")
    if cfg.source != "stdlib":
        resolve_paths(source=cfg.source, paths=list(cfg.paths))
    if cfg.tokenizer:
        _need(Path(cfg.tokenizer).expanduser().is_file(),
              f"data.tokenizer={cfg.tokenizer}: no such tokenizer.json file")


def check_model(cfg) -> None:
    _need(cfg.family in ("llama", "gpt2"), f"model.family={cfg.family!r} is not one of: llama, gpt2")
    _need(cfg.hidden_size % cfg.num_heads == 0,
          f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}")
    if cfg.num_kv_heads:
        _need(cfg.num_heads % cfg.num_kv_heads == 0,
              f"model.num_heads={cfg.num_heads} is not divisible by model.num_kv_heads={cfg.num_kv_heads}")
    if cfg.pretrained:
        _need((Path(cfg.pretrained).expanduser() / "config.json").is_file(),
              f"model.pretrained={cfg.pretrained}: no config.json there (give a local Hugging Face checkpoint dir)")


def check_precision(cfg) -> None:
    _need(cfg.autocast_dtype in (None, "bfloat16", "float16"),
          f"precision.autocast_dtype={cfg.autocast_dtype!r} is not one of: null, bfloat16, float16")
    for key in ("param_dtype", "reduce_dtype"):
        _need(cfg[key] in _DTYPES, f"precision.{key}={cfg[key]!r} is not one of: {', '.join(_DTYPES)}")


def check_parallel(cfg, *, launcher) -> None:
    _need(launcher.nproc_per_node >= 1 and launcher.nnodes >= 1,
          f"launcher.nproc_per_node={launcher.nproc_per_node} and launcher.nnodes={launcher.nnodes} must be >= 1")
    _need(cfg.activation_checkpointing in ("none", "full", "selective"),
          f"parallel.activation_checkpointing={cfg.activation_checkpointing!r} is not one of: none, full, selective")
