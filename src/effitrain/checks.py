"""Checks of a composed config, run before any process starts (no torch): the top-level keys, each group's own
checks (in the group's package), then the rules that span groups -- all of those live here, and only here.

Each check raises UsageError with one line: what is wrong and what would be right.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from effitrain.compose import GROUPS
from effitrain.compression import chosen
from effitrain.errors import UsageError
from effitrain.launcher import world_size
from effitrain.model import kv_heads
from effitrain.optimizer import STOCHASTIC_ROUNDING
from effitrain.parallel import FSDP_STRATEGIES, parallel_degrees
from effitrain.precision import param_dtype

TP_FAMILIES = ("llama", "gpt2")  # families with a tensor-parallel plan (parallel/build.py)


def check_all(cfg) -> None:
    check_run(cfg)
    for group in GROUPS:
        group.check(cfg[group.name])
    check_precision_device(cfg.precision, device=cfg.device)
    check_precision_layout(cfg.precision, parallel=cfg.parallel)
    check_optimizer_layout(cfg.optimizer, precision=cfg.precision, parallel=cfg.parallel)
    check_parallel(cfg.parallel, launcher=cfg.launcher, model=cfg.model, seq_len=cfg.data.seq_len)
    check_compression(cfg.compression, parallel=cfg.parallel, precision=cfg.precision, model=cfg.model,
                      device=cfg.device, max_steps=cfg.max_steps)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def check_run(cfg) -> None:
    for key in ("max_steps", "batch_size", "grad_accum_steps", "eval_every", "eval_batches"):
        _need(cfg[key] > 0, f"{key}={cfg[key]} must be a positive integer")
    _need(cfg.grad_clip >= 0, f"grad_clip={cfg.grad_clip} must be >= 0 (0 measures the norm without clipping)")
    _need(cfg.nan_policy in ("abort", "skip"), f"nan_policy={cfg.nan_policy!r} is not one of: abort, skip")
    _need(cfg.nan_patience > 0, f"nan_patience={cfg.nan_patience} must be a positive integer")
    _need(cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r} is not one of: auto, cpu, cuda")
    _need(cfg.eval.task_items > 0, f"eval.task_items={cfg.eval.task_items} must be a positive integer")
    check_names(cfg)
    from effitrain.eval.tasks import check_specs

    check_specs(list(cfg.eval.tasks))


def check_names(cfg) -> None:
    """Strings that become part of a path or of a line in a run's files. `name` ends the run (and sweep) directory's
    name (hydra.run.dir) and starts its log: a path separator would put the run in another directory, a newline
    would forge a log line, a NUL no file system takes. Each option's name is in that log line; an eval task file's
    stem names its metric (data.sources names are checked with the mix, data.source_configs)."""
    name = cfg.name
    _need(name not in ("", ".", "..") and not any(c in "/\\" for c in name) and _one_line(name),
          f"name={name!r} names the run directory and its log lines: use a name without a path separator (/ or \\), "
          "newline or other control character (and not empty, . or ..)")
    for group in GROUPS:
        for path, node in group.nodes(cfg[group.name]).items():
            label = str(node.get("name") or "")
            _need(_one_line(label), f"{'.'.join(filter(None, (group.name, path, 'name')))}={label!r} is written into "
                                    "the run's log: no newline or other control character")
    for spec in cfg.eval.tasks:
        _need(_one_line(spec), f"eval.tasks: {spec!r} names a task file and its metric: no newline or other control "
                               "character")


def _one_line(text: str) -> bool:
    """No control character (newline, carriage return, NUL, escape...): the text stays one line of one file name."""
    return not any(unicodedata.category(c) == "Cc" for c in text)


def check_precision_device(precision, *, device: str) -> None:
    """fp8 needs an NVIDIA GPU; without a driver there is none (the capability check needs torch: the worker makes
    it at start, precision.build.check_fp8_device)."""
    if precision.kind != "fp8":
        return
    no_gpu = device == "cpu" or (device == "auto" and not Path("/proc/driver/nvidia/version").exists())
    _need(not no_gpu, f"precision=fp8 needs a CUDA GPU with compute capability >= 8.9; device={device} "
                      f"{'is the CPU' if device == 'cpu' else 'finds no NVIDIA GPU'} (use precision=bf16)")


def check_precision_layout(precision, *, parallel) -> None:
    """reduce_dtype is FSDP's reduce-scatter dtype; every other layout reduces gradients in the parameters' dtype."""
    if "reduce_dtype" not in precision or parallel.strategy in FSDP_STRATEGIES:
        return
    _need(precision.reduce_dtype == param_dtype(precision),
          f"precision.reduce_dtype={precision.reduce_dtype} is the FSDP reduce-scatter dtype; parallel="
          f"{parallel.name} reduces gradients in the parameters' dtype ({param_dtype(precision)}): leave "
          f"reduce_dtype={param_dtype(precision)} or use an FSDP layout")


def check_optimizer_layout(optimizer, *, precision, parallel) -> None:
    _need(optimizer.kind != "zero1" or parallel.strategy == "ddp",
          f"optimizer=zero1 shards AdamW state over DDP ranks: it needs parallel=ddp, not parallel={parallel.strategy}"
          " (FSDP already shards optimizer state; use optimizer=adamw there)")
    # Newton-Schulz orthogonalises whole matrices: sharded (FSDP/TP) weights would be orthogonalised per shard
    _need(optimizer.kind != "muon" or parallel.strategy in ("single", "ddp"),
          f"optimizer=muon needs whole weight matrices on each rank: parallel=single or ddp, not {parallel.strategy}")
    # its factored second moment reduces a shard's rows to a partial-norm DTensor that its in-place update cannot
    # take (torch 2.13: "in-place operations that require placement changes are not supported", foreach and loop)
    _need(optimizer.kind != "adafactor" or parallel.strategy in ("single", "ddp"),
          f"optimizer=adafactor fails on sharded (DTensor) parameters in torch's Adafactor: use parallel=single or "
          f"ddp with it, not {parallel.strategy} (or optimizer=adamw-8bit for small optimizer state under FSDP)")
    _need(param_dtype(precision) != "bfloat16" or optimizer.kind in STOCHASTIC_ROUNDING,
          f"precision=bf16-pure updates bf16 weights with stochastic rounding, which optimizer=adamw and adamw-8bit "
          f"have; optimizer={optimizer.kind} has not (use precision=bf16 with it)")


def check_parallel(cfg, *, launcher, model, seq_len: int) -> None:
    """The layout against the world size the launcher asks for, the model's heads and the sequence length."""
    degrees = parallel_degrees(cfg, world_size=world_size(launcher))
    if "sequence_parallel" in cfg and cfg.sequence_parallel:
        # sequence parallel splits the TP group's activations along the sequence: no TP group, nothing to split
        _need(degrees.tp > 1, f"parallel.sequence_parallel=true needs a tensor-parallel degree > 1, not "
                              f"parallel.tp={degrees.tp}")
        _need(seq_len % degrees.tp == 0,
              f"parallel.sequence_parallel=true splits data.seq_len={seq_len} over parallel.tp={degrees.tp} ranks; "
              "make data.seq_len a multiple of it")
    if degrees.tp > 1:
        _need(model.family in TP_FAMILIES,
              f"parallel.strategy={cfg.strategy} has a tensor-parallel plan for model.family in "
              f"{', '.join(TP_FAMILIES)}, not {model.family!r}; use parallel=fsdp or ddp")
        for key, heads in (("num_heads", model.num_heads), ("num_kv_heads", kv_heads(model))):
            _need(heads % degrees.tp == 0,
                  f"model.{key}={heads} is not divisible by the tensor-parallel degree {degrees.tp}")


# where each compression method runs (the layouts its code and tests cover), and why not elsewhere
COMPRESSION_LAYOUTS = {
    "grad_fp16": (("ddp",), "it is a DDP communication hook (FSDP reduce-scatters in precision.reduce_dtype: use "
                            "precision=bf16 with parallel=fsdp for bf16 gradient reduction)"),
    "grad_powersgd": (("ddp",), "it is a DDP communication hook; FSDP/TP have no PowerSGD"),
    "share_layers": (("single", "ddp"), "FSDP and TP shard each block in place and cannot shard one module shared "
                                        "by several positions"),
    "lora": (("single", "ddp", "fsdp"), "the TP plans do not cover peft's adapter layers"),
    "qat_int8": (("single", "ddp", "fsdp"), "the TP plans do not cover torchao's fake-quantized Linears"),
    "qat_int4": (("single", "ddp", "fsdp"), "the TP plans do not cover torchao's fake-quantized Linears"),
    "prune_magnitude": (("single", "ddp", "fsdp"), "masks are kept on whole weights or 1-D FSDP shards only"),
    "prune_2of4": (("single", "ddp", "fsdp"), "masks are kept on whole weights or 1-D FSDP shards only"),
    "distill": (("single", "ddp", "fsdp"), "the teacher is placed like the student only for these layouts"),
}


def check_compression(cfg, *, parallel, precision, model, device: str, max_steps: int) -> None:
    """Each chosen compression method against the layout, precision, model and run length."""
    kinds = chosen(cfg)
    for kind in kinds:
        if kind in COMPRESSION_LAYOUTS:
            layouts, why = COMPRESSION_LAYOUTS[kind]
            _need(parallel.strategy in layouts, f"compression={cfg[kind].name} runs under parallel="
                                                f"{' or '.join(layouts)}, not {parallel.name}: {why}")
    if "grad_fp16" in kinds and cfg.grad_fp16.dtype == "bfloat16":
        no_gpu = device == "cpu" or (device == "auto" and not Path("/proc/driver/nvidia/version").exists())
        _need(not no_gpu, "compression.grad_fp16.dtype=bfloat16 needs CUDA + NCCL (gloo cannot all-reduce "
                          "bfloat16 buckets): use dtype=float16 on the CPU")
    for kind in ("qat_int8", "qat_int4"):
        _need(kind not in kinds or precision.kind != "fp8",
              f"compression={cfg[kind].name if kind in kinds else kind} and precision=fp8 both replace the Linears: "
              "use precision=bf16 with QAT")
    _need("lora" not in kinds or bool(model.pretrained),
          "compression=lora adapts a pretrained model: set model.pretrained=<local HF model directory> (its random "
          "frozen weights would learn next to nothing)")
    for qat in ("qat_int8", "qat_int4"):
        if qat in kinds:
            _need(cfg[qat].start_step < max_steps,
                  f"compression.{qat}.start_step={cfg[qat].start_step} is not before max_steps={max_steps}: the run "
                  "would never fake-quantize")
    if "prune_magnitude" in kinds:
        _need(cfg.prune_magnitude.end_step <= max_steps,
              f"compression.prune_magnitude.end_step={cfg.prune_magnitude.end_step} is past max_steps={max_steps}: "
              "the run would end before reaching final_sparsity")
    if "share_layers" in kinds:
        _need(model.num_layers % cfg.share_layers.every == 0,
              f"compression.share_layers.every={cfg.share_layers.every} does not divide model.num_layers="
              f"{model.num_layers}")
