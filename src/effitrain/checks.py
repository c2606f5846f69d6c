"""Checks of a composed config that need no worker and no torch: run before any process starts.

Each check raises UsageError with one line: what is wrong and what would be right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from effitrain.errors import UsageError

_DTYPES = ("float32", "bfloat16", "float16")


def check_all(cfg) -> None:
    check_schema(cfg)
    check_run(cfg)
    check_data(cfg.data)
    check_model(cfg.model)
    check_precision(cfg.precision, device=cfg.device)
    check_optimizer(cfg.optimizer, precision=cfg.precision, parallel=cfg.parallel)
    check_schedule(cfg.schedule)
    check_parallel(cfg.parallel, launcher=cfg.launcher, model=cfg.model, seq_len=cfg.data.seq_len)


def check_schema(cfg) -> None:
    """Keys Hydra let in with `+key=value` must still be keys of the schema: nothing is silently ignored."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    from effitrain.config import TrainConfig

    try:
        # merge a plain copy: merging one typed node into another lets keys added with `+` through
        plain = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"}
        OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
    except ConfigKeyError as e:
        raise UsageError(f"unknown key {e.full_key!r} (effitrain train --cfg job lists every key)") from None


def world_size(launcher) -> int:
    """Processes the launcher group asks for (every node's workers)."""
    return launcher.nproc_per_node * launcher.nnodes


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


def check_precision(cfg, *, device: str) -> None:
    _need(cfg.autocast_dtype in (None, "bfloat16", "float16"),
          f"precision.autocast_dtype={cfg.autocast_dtype!r} is not one of: null, bfloat16, float16")
    for key in ("param_dtype", "reduce_dtype"):
        _need(cfg[key] in _DTYPES, f"precision.{key}={cfg[key]!r} is not one of: {', '.join(_DTYPES)}")
    _need(not cfg.loss_scaling or cfg.autocast_dtype == "float16",
          "precision.loss_scaling=true needs precision.autocast_dtype=float16 (bf16 and fp32 need no loss scaling)")
    _need(cfg.param_dtype != "float16",
          "precision.param_dtype=float16 (pure fp16) is not supported: use precision=fp16 (autocast + loss scaling)")
    _need(0 < cfg.backoff_factor < 1 < cfg.growth_factor and cfg.growth_interval > 0 and cfg.init_scale > 0,
          "precision: loss scaling needs 0 < backoff_factor < 1 < growth_factor, growth_interval > 0, init_scale > 0")
    if cfg.fp8_recipe is not None:
        _need(cfg.fp8_recipe in ("tensorwise", "rowwise"),
              f"precision.fp8_recipe={cfg.fp8_recipe!r} is not one of: null, tensorwise, rowwise")
        # without an NVIDIA driver there is no fp8 device; the capability check needs torch, so the worker makes
        # it at start (precision.check_fp8_device)
        no_gpu = device == "cpu" or (device == "auto" and not Path("/proc/driver/nvidia/version").exists())
        _need(not no_gpu, f"precision=fp8 needs a CUDA GPU with compute capability >= 8.9; device={device} "
                          f"{'is the CPU' if device == 'cpu' else 'finds no NVIDIA GPU'} (use precision=bf16)")


OPTIMIZERS = ("adamw", "adamw-8bit", "sgd", "adafactor", "muon", "zero1")
SCHEDULES = ("constant", "cosine", "linear", "wsd", "inverse-sqrt")


def check_optimizer(cfg, *, precision, parallel) -> None:
    _need(cfg.kind in OPTIMIZERS, f"optimizer.kind={cfg.kind!r} is not one of: {', '.join(OPTIMIZERS)}")
    _need(cfg.lr > 0, f"optimizer.lr={cfg.lr} must be > 0")
    _need(cfg.weight_decay >= 0, f"optimizer.weight_decay={cfg.weight_decay} must be >= 0")
    _need(cfg.implementation in ("auto", "fused", "foreach", "loop"),
          f"optimizer.implementation={cfg.implementation!r} is not one of: auto, fused, foreach, loop")
    unknown = set(cfg.no_decay) - {"bias", "norm", "embedding"}
    _need(not unknown, f"optimizer.no_decay has {sorted(unknown)}; allowed entries: bias, norm, embedding")
    _need(cfg.kind != "zero1" or parallel.strategy == "ddp",
          f"optimizer=zero1 shards AdamW state over DDP ranks: it needs parallel=ddp, not parallel={parallel.strategy}"
          " (FSDP already shards optimizer state; use optimizer=adamw there)")
    # Newton-Schulz orthogonalises whole matrices: sharded (FSDP/TP) weights would be orthogonalised per shard
    _need(cfg.kind != "muon" or parallel.strategy in ("single", "ddp"),
          f"optimizer=muon needs whole weight matrices on each rank: parallel=single or ddp, not {parallel.strategy}")
    _need(precision.param_dtype != "bfloat16" or cfg.kind in ("adamw", "adamw-8bit"),
          f"precision=bf16-pure updates bf16 weights with stochastic rounding, which optimizer=adamw and adamw-8bit "
          f"have; optimizer={cfg.kind} has not (use precision=bf16 with it)")


def check_schedule(cfg) -> None:
    _need(cfg.kind in SCHEDULES, f"schedule.kind={cfg.kind!r} is not one of: {', '.join(SCHEDULES)}")
    _need(cfg.warmup_steps >= 0, f"schedule.warmup_steps={cfg.warmup_steps} must be >= 0")
    _need(cfg.warmup_ratio is None or 0 <= cfg.warmup_ratio < 1,
          f"schedule.warmup_ratio={cfg.warmup_ratio} must lie in [0, 1) (or be null to use warmup_steps)")
    _need(0 <= cfg.min_lr_ratio <= 1, f"schedule.min_lr_ratio={cfg.min_lr_ratio} must lie in [0, 1]")
    _need(0 < cfg.decay_ratio <= 1, f"schedule.decay_ratio={cfg.decay_ratio} must lie in (0, 1]")
    _need(cfg.decay_shape in ("linear", "cosine", "1-sqrt"),
          f"schedule.decay_shape={cfg.decay_shape!r} is not one of: linear, cosine, 1-sqrt")


STRATEGIES = ("single", "ddp", "fsdp", "hsdp", "tp", "fsdp-tp")
TP_FAMILIES = ("llama", "gpt2")  # families with a tensor-parallel plan (parallel.py)


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


def check_parallel(cfg, *, launcher, model, seq_len: int) -> None:
    _need(launcher.nproc_per_node >= 1 and launcher.nnodes >= 1,
          f"launcher.nproc_per_node={launcher.nproc_per_node} and launcher.nnodes={launcher.nnodes} must be >= 1")
    _need(launcher.start_method in ("auto", "spawn", "fork", "forkserver"),
          f"launcher.start_method={launcher.start_method!r} is not one of: auto, spawn, fork, forkserver")
    _need(launcher.nnodes == 1 or launcher.rdzv_endpoint is not None,
          f"launcher.nnodes={launcher.nnodes} needs launcher.rdzv_endpoint=HOST:PORT (a node every node can reach)")
    degrees = parallel_degrees(cfg, world_size=world_size(launcher))
    _need(cfg.activation_checkpointing in ("none", "full", "selective"),
          f"parallel.activation_checkpointing={cfg.activation_checkpointing!r} is not one of: none, full, selective")
    _need(cfg.ac_every >= 1, f"parallel.ac_every={cfg.ac_every} must be >= 1")
    _need(cfg.offload in (None, "cpu"), f"parallel.offload={cfg.offload!r} is not one of: null, cpu")
    _need(cfg.offload is None or cfg.strategy in ("fsdp", "hsdp", "fsdp-tp"),
          f"parallel.offload=cpu needs an FSDP strategy (fsdp, fsdp-zero2, hsdp, fsdp-tp), "
          f"not parallel.strategy={cfg.strategy}")
    # sequence parallel splits the TP group's activations along the sequence: no TP group, nothing to split
    _need(not cfg.sequence_parallel or degrees.tp > 1,
          f"parallel.sequence_parallel=true needs tensor parallelism (parallel=tp or fsdp-tp with a degree > 1), "
          f"not parallel.strategy={cfg.strategy} with tp={degrees.tp}")
    _need(not cfg.sequence_parallel or seq_len % degrees.tp == 0,
          f"parallel.sequence_parallel=true splits data.seq_len={seq_len} over parallel.tp={degrees.tp} ranks; "
          "make data.seq_len a multiple of it")
    if degrees.tp > 1:
        _need(model.family in TP_FAMILIES,
              f"parallel.strategy={cfg.strategy} has a tensor-parallel plan for model.family in "
              f"{', '.join(TP_FAMILIES)}, not {model.family!r}; use parallel=fsdp or ddp")
        for key, heads in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads or model.num_heads)):
            _need(heads % degrees.tp == 0,
                  f"model.{key}={heads} is not divisible by the tensor-parallel degree {degrees.tp}")
