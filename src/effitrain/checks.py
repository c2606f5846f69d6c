"""Checks of a composed config that need no worker and no torch: run before any process starts.

Each check raises UsageError with one line: what is wrong and what would be right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from effitrain.errors import UsageError

_DTYPES = ("float32", "bfloat16", "float16")


def check_all(cfg) -> None:
    check_run(cfg)
    check_data(cfg.data)
    check_model(cfg.model)
    check_precision(cfg.precision)
    check_parallel(cfg.parallel, launcher=cfg.launcher, model=cfg.model)


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


STRATEGIES = ("single", "ddp", "fsdp", "hsdp", "tp", "fsdp-tp")
TP_FAMILIES = ("llama",)  # families with a tensor-parallel plan (parallel.py)


@dataclass(frozen=True)
class Degrees:
    """How the world splits: data-parallel replicas x data-parallel shards x tensor-parallel ranks."""

    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def dp(self) -> int:
        """Data-parallel world size: ranks that read different batches."""
        return self.dp_replicate * self.dp_shard


def parallel_degrees(cfg, *, world_size: int) -> Degrees:
    """The one place parallel degrees are checked against the world size (CLI and workers both call it)."""
    s = cfg.strategy
    _need(s in STRATEGIES, f"parallel.strategy={s!r} is not one of: {', '.join(STRATEGIES)}")
    _need(s != "single" or world_size == 1,
          f"parallel=single runs one process but the world size is {world_size}; "
          "choose parallel=ddp, fsdp, fsdp-zero2, hsdp, tp or fsdp-tp, or launcher.nproc_per_node=1")
    tp = 1
    if s in ("tp", "fsdp-tp"):
        tp = world_size if cfg.tp == -1 else cfg.tp
        _need(tp >= 1 and world_size % tp == 0,
              f"parallel.tp={cfg.tp} does not divide the world size {world_size} "
              "(launcher.nproc_per_node x launcher.nnodes); pick a divisor")
    _need(s != "tp" or tp == world_size,
          f"parallel=tp uses all {world_size} ranks for one tensor-parallel group but parallel.tp={tp}; "
          "use parallel=fsdp-tp for tensor x data parallel")
    dp = world_size // tp
    replicate = {"ddp": dp, "hsdp": cfg.dp_replicate}.get(s, 1)
    _need(replicate >= 1 and dp % replicate == 0,
          f"parallel.dp_replicate={cfg.dp_replicate} does not divide the {dp} data-parallel ranks")
    shard = 1 if s in ("single", "ddp", "tp") else (dp // replicate if cfg.dp_shard == -1 else cfg.dp_shard)
    _need(replicate * shard == dp,
          f"parallel.dp_replicate={replicate} x parallel.dp_shard={shard} = {replicate * shard}, but the world "
          f"size {world_size} / parallel.tp={tp} leaves {dp} data-parallel ranks; make the product {dp}")
    return Degrees(dp_replicate=replicate, dp_shard=shard, tp=tp)


def check_parallel(cfg, *, launcher, model) -> None:
    _need(launcher.nproc_per_node >= 1 and launcher.nnodes >= 1,
          f"launcher.nproc_per_node={launcher.nproc_per_node} and launcher.nnodes={launcher.nnodes} must be >= 1")
    _need(launcher.start_method in ("auto", "spawn", "fork", "forkserver"),
          f"launcher.start_method={launcher.start_method!r} is not one of: auto, spawn, fork, forkserver")
    _need(launcher.nnodes == 1 or launcher.rdzv_endpoint not in (None, "???"),
          f"launcher.nnodes={launcher.nnodes} needs launcher.rdzv_endpoint=HOST:PORT (a node every node can reach)")
    degrees = parallel_degrees(cfg, world_size=launcher.nproc_per_node * launcher.nnodes)
    _need(cfg.activation_checkpointing in ("none", "full", "selective"),
          f"parallel.activation_checkpointing={cfg.activation_checkpointing!r} is not one of: none, full, selective")
    _need(cfg.ac_every >= 1, f"parallel.ac_every={cfg.ac_every} must be >= 1")
    _need(cfg.offload in (None, "cpu"), f"parallel.offload={cfg.offload!r} is not one of: null, cpu")
    _need(cfg.offload is None or cfg.strategy in ("fsdp", "hsdp", "fsdp-tp"),
          f"parallel.offload=cpu needs an FSDP strategy (fsdp, fsdp-zero2, hsdp, fsdp-tp), "
          f"not parallel.strategy={cfg.strategy}")
    _need(not cfg.sequence_parallel,
          "parallel.sequence_parallel=true is not implemented yet; use parallel.sequence_parallel=false")
    if degrees.tp > 1:
        _need(model.family in TP_FAMILIES,
              f"parallel.strategy={cfg.strategy} has a tensor-parallel plan for model.family in "
              f"{', '.join(TP_FAMILIES)}, not {model.family!r}; use parallel=fsdp or ddp")
        for key, heads in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads or model.num_heads)):
            _need(heads % degrees.tp == 0,
                  f"model.{key}={heads} is not divisible by the tensor-parallel degree {degrees.tp}")
