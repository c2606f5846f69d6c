"""Model FLOPs per token (PaLM appendix B) and the device's peak FLOP/s (table, or a measured probe).

Peak FLOP/s, which MFU divides by, comes from one of two places:

- **Known GPUs** (H100/H200/A100/L4/V100): the vendor datasheet's dense peak for the compute dtype
  (`PEAK_FLOPS`; `peak_flops_source: "table"`).
- **Anything else** (CPUs, unknown GPUs): a measured peak, cached. A probe is a best-of loop over a square
  Linear (1024^3 on CPU, 2048^3 on CUDA) under the run's autocast setting. The first run for a probe key --
  host, device model, torch version, peak dtype, autocast dtype, torch thread count -- probes for
  `FIRST_PROBE_S` (3 s); every later run with that key probes for `PROBE_S` (0.3 s) and the cache keeps the
  **highest reading ever seen** for the key. The cache is one JSON file, `~/.cache/effitrain/peak_flops.json`
  (`EFFITRAIN_PEAK_CACHE` names another file), holding per key the peak, the date of the probe that set it,
  the number of probes and the last reading; `peak_flops_source` then says e.g.
  "measured (cached 2026-12-01T07:45)". Delete the file to start over (a changed machine behind one host name).

Why the maximum ever seen, not the latest or a fresh probe per run: a probe times real matmuls, so it can read
the machine's rate or less -- less while other processes share the cores -- but not more. The maximum over
probes therefore only rises, towards the quiet machine's rate, and stays there once one probe has run on a
quiet machine. Two runs of one config then divide by the same peak, so their MFU differs only as their
throughput does (a fresh 0.3 s probe per run moved MFU with the load at run start instead); on a busy machine
MFU reads low, the share of the quiet machine's peak the run got. What it does not fix: until a quiet probe has
been cached, the peak is a loaded reading, and a run whose load then drops can read above 100% -- each run's
own probe raises the cache, so the next run of that key is corrected, and the first run of a key probes 10x
longer to make such a reading unlikely. A model whose matmuls are larger than the probe's could also beat it a
little (the CPU probe is 1024^3: more than the default models' matmuls).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("effitrain")

# Dense (no sparsity) peak FLOP/s from vendor datasheets, keyed by a substring of the device name.
# Order matters: more specific names first. Unknown devices are measured, never guessed.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12, "float8": 1978.9e12}),
    ("H100 PCIe", {"float32": 51e12, "tf32": 378e12, "bfloat16": 756e12, "float16": 756e12, "float8": 1513e12}),
    ("H100 NVL", {"float32": 60e12, "tf32": 417.5e12, "bfloat16": 835e12, "float16": 835e12, "float8": 1670e12}),
    ("H100", {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12, "float8": 1978.9e12}),
    ("A100", {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12}),
    ("L4", {"float32": 30.3e12, "tf32": 60e12, "bfloat16": 121e12, "float16": 121e12, "float8": 242.5e12}),
    ("V100", {"float32": 15.7e12, "float16": 125e12}),
]

PEAK_CACHE_ENV = "EFFITRAIN_PEAK_CACHE"  # another file for the measured-peak cache (tests use a tmp file)
DEFAULT_PEAK_CACHE = "~/.cache/effitrain/peak_flops.json"
FIRST_PROBE_S = 3.0  # best-of time of the first probe of a key: long enough to catch quiet moments of a busy box
PROBE_S = 0.3  # every later run: a short probe that can only raise the cached peak
LOADED_WARNING = 0.5  # this run's probe under half the cached peak: say the machine looks busy


def model_flops_per_token(model: nn.Module, *, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's count for any transformers decoder: 6·N_active + 12·Σ_layers q_width·T_layer.

    N_active counts the matmul weights one token runs through: input embeddings only when tied to the LM head, and
    of a mixture-of-experts model's expert weights only the share a token is routed to (experts per token / experts;
    the router and shared experts count whole). q_width is heads x head_dim (not the hidden size where a family's
    head_dim differs); T_layer is the sequence length, or a sliding-window layer's window when shorter.
    """
    cfg = model.config.get_text_config()
    n = sum(p.numel() for p in model.parameters())
    embedding_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    n -= embedding_params - (model.get_input_embeddings().weight.numel() if tied else 0)
    n -= expert_params(model) * (1 - active_expert_share(cfg))
    heads = cfg.num_attention_heads
    q_width = heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    attention = sum(min(seq_len, window or seq_len) for window in attention_windows(cfg))
    return 6 * n + 12 * q_width * attention


def expert_params(model: nn.Module) -> int:
    """Parameters of routed experts (transformers' `mlp.experts` modules; a shared expert is not among them)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".experts." in f".{name}")


def active_expert_share(cfg) -> float:
    """The share of a mixture-of-experts layer's expert weights each token runs through (1 for a dense model)."""
    experts = next((getattr(cfg, key) for key in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(cfg, key, None)), None)
    return cfg.num_experts_per_tok / experts if experts else 1.0


def attention_windows(cfg) -> list[int | None]:
    """Each layer's attention span: its sliding window (Gemma's local layers, Mistral's window), or None (full)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    if window and getattr(cfg, "use_sliding_window", True):
        return [window] * cfg.num_hidden_layers
    return [None] * cfg.num_hidden_layers


def table_peak(device_name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_FLOPS:
        if re.search(rf"\b{re.escape(key)}\b", device_name):  # whole words: "L4" must not match "L40S"
            return peaks.get(dtype)
    return None


def probe_size(device: torch.device) -> int:
    return 2048 if device.type == "cuda" else 1024


def measure_peak(device: torch.device, autocast_dtype: torch.dtype | None, *, budget_s: float = PROBE_S,
                 size: int | None = None) -> float:
    """Best FLOP/s of a square Linear under the run's autocast setting, within a time budget (size: the Linear's,
    default probe_size(device))."""
    size = size or probe_size(device)
    x = torch.randn(size, size, device=device)
    w = torch.randn(size, size, device=device)
    enabled = autocast_dtype is not None
    ctx = torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled) if enabled else nullcontext()
    best = 0.0
    deadline = time.perf_counter() + budget_s
    with ctx, torch.no_grad():
        torch.nn.functional.linear(x, w)  # warm-up: kernel selection, first-touch allocations
        while True:
            _sync(device)
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            _sync(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - t0))
            if time.perf_counter() > deadline:
                return best


def peak_cache_path() -> Path:
    return Path(os.environ.get(PEAK_CACHE_ENV) or DEFAULT_PEAK_CACHE).expanduser()


def probe_key(device: torch.device, *, dtype: str, autocast_dtype: torch.dtype | None) -> dict[str, str | int]:
    """What a measured peak depends on: the machine, torch, the compute dtype and (on CPU) the thread count."""
    model = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    key: dict[str, str | int] = {
        "host": platform.node(), "device": f"{device.type}: {model}", "torch": torch.__version__, "dtype": dtype,
        "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype is not None else "none",
        "probe": f"linear {probe_size(device)}^3"}
    if device.type == "cpu":
        key["threads"] = torch.get_num_threads()
    return key


def cached_peak(device: torch.device, *, dtype: str, autocast_dtype: torch.dtype | None) -> tuple[float, str]:
    """(peak FLOP/s, source): the highest probe reading ever cached for this key, this run's probe included."""
    path = peak_cache_path()
    key = probe_key(device, dtype=dtype, autocast_dtype=autocast_dtype)
    name = json.dumps(key, sort_keys=True)
    entries = _read_cache(path)
    entry = entries.get(name)
    reading = measure_peak(device, autocast_dtype, budget_s=PROBE_S if entry else FIRST_PROBE_S)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    if entry and entry["peak_flops"] >= reading:
        if reading < LOADED_WARNING * entry["peak_flops"]:
            log.warning(f"peak FLOP/s probe read {reading / 1e12:.3f} TFLOP/s, under half the cached "
                        f"{entry['peak_flops'] / 1e12:.3f} of {entry['measured']}: the machine looks busy, "
                        f"so MFU will read low")
        entry |= {"probes": entry["probes"] + 1, "last_reading": reading, "last_probe": now}
        source = f"measured (cached {entry['measured'][:16]})"
    else:
        entry = {"key": key, "peak_flops": reading, "measured": now, "probe_s": PROBE_S if entry else FIRST_PROBE_S,
                 "probes": entry["probes"] + 1 if entry else 1, "last_reading": reading, "last_probe": now}
        source = f"measured (new max, cached {now[:16]})"
    entries[name] = entry
    try:
        _write_cache(path, entries)
    except OSError as e:
        log.warning(f"peak FLOP/s cache {path} not written ({e}); this run's probe is used alone")
        return reading, "measured (not cached)"
    return entry["peak_flops"], source


def peak_flops(device: torch.device, *, dtype: str, autocast_dtype: torch.dtype | None) -> tuple[float | None, str]:
    """(peak FLOP/s per device, source): 'table' for known GPUs, 'measured (...)' otherwise (see the module
    docstring), (None, 'undefined') for fp8."""
    if dtype == "float8":
        return None, "undefined"  # fp8 runs mix fp8 and bf16 matmuls: no single honest peak
    if device.type == "cuda":
        peak = table_peak(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak, "table"
    return cached_peak(device, dtype=dtype, autocast_dtype=autocast_dtype)


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())["entries"]
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # none yet, or unreadable: start a new one


def _write_cache(path: Path, entries: dict) -> None:
    # atomic: the ranks of a multi-process CPU run probe and write at the same time; a reader never sees half
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": 1, "entries": entries}, indent=2))
    os.replace(tmp, path)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
