"""Is reduced precision emulated here? A CPU without native fp16/bf16 matmuls runs autocast's fp16/bf16 many times
slower than fp32 (on the 2-core CI box fp16 is ~25-50x slower), and nothing else would tell the user why a
`precision=fp16` run crawls. A small matmul probe, fp32 vs the autocast dtype, measures the slowdown once per
host (a fraction of a second) and caches it beside the measured peak FLOP/s (flops.py's cache file,
EFFITRAIN_PEAK_CACHE); a run then warns in one line when the slowdown is material. A CPU with native bf16
(AMX, avx512_bf16) measures near 1x and stays quiet; GPUs are never probed.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform

import torch

log = logging.getLogger("effitrain")

SLOWDOWN_WARNING = 2.0  # warn from this measured slowdown on: below it, reduced precision costs little here
PROBE_SIZE = 256  # square Linear: ~0.5 ms in fp32 on one core, tens of ms where fp16 is emulated
PROBE_S = 0.1  # best-of time per dtype (flops.measure_peak)
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def cpu_slowdown(dtype: torch.dtype) -> tuple[float, str]:
    """(time of a matmul under CPU autocast to `dtype` / its fp32 time, 'cached' or 'measured'), probed once per
    host, torch version and thread count, then read from the cache."""
    from effitrain.base import flops

    key = {"probe": f"cpu autocast slowdown, linear {PROBE_SIZE}^3", "host": platform.node(),
           "device": f"cpu: {flops._cpu_model()}", "torch": torch.__version__, "dtype": NAMES.get(dtype, str(dtype)),
           "threads": torch.get_num_threads()}
    name = json.dumps(key, sort_keys=True)
    path = flops.peak_cache_path()
    entries = flops._read_cache(path)
    if isinstance(entries.get(name), dict) and isinstance(entries[name].get("slowdown"), (int, float)):
        return float(entries[name]["slowdown"]), "cached"
    cpu = torch.device("cpu")
    slowdown = flops.measure_peak(cpu, None, budget_s=PROBE_S, size=PROBE_SIZE) / \
        flops.measure_peak(cpu, dtype, budget_s=PROBE_S, size=PROBE_SIZE)
    entries[name] = {"key": key, "slowdown": slowdown,
                     "measured": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        flops._write_cache(path, entries)
    except OSError as e:
        log.warning(f"precision probe cache {path} not written ({e})")
    return slowdown, "measured"


def warn_if_emulated(precision) -> float | None:
    """One warning line when this run's autocast dtype runs materially slower than fp32 on this CPU; returns the
    measured slowdown (None where nothing is probed: fp32/tf32, or a GPU)."""
    if precision.device.type != "cpu" or precision.autocast_dtype is None:
        return None
    slowdown, _ = cpu_slowdown(precision.autocast_dtype)
    if slowdown >= SLOWDOWN_WARNING:
        name = NAMES.get(precision.autocast_dtype, str(precision.autocast_dtype))
        log.warning(f"{name} on this CPU runs ~{slowdown:.0f}x slower than fp32 (emulated: no native {name} "
                    f"matmuls; a {PROBE_SIZE}^3 matmul probe); precision speed-ups show on GPUs")
    return slowdown
