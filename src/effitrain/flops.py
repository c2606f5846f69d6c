"""Model FLOPs per token (PaLM appendix B) and the device's peak FLOP/s (table, or a measured probe)."""

from __future__ import annotations

import re
import time
from contextlib import nullcontext

import torch
from torch import nn

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


def model_flops_per_token(model: nn.Module, *, seq_len: int) -> float:
    """6N + 12·L·d·T: N counts the matmul weights (input embeddings only when tied to the LM head)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    embedding_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    n -= embedding_params - (model.get_input_embeddings().weight.numel() if tied else 0)
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    return 6 * n + 12 * layers * hidden * seq_len


def table_peak(device_name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_FLOPS:
        if re.search(rf"\b{re.escape(key)}\b", device_name):  # whole words: "L4" must not match "L40S"
            return peaks.get(dtype)
    return None


def measure_peak(device: torch.device, autocast_dtype: torch.dtype | None, *, budget_s: float = 0.3) -> float:
    """Best FLOP/s of a square Linear under the run's autocast setting, within a time budget."""
    size = 2048 if device.type == "cuda" else 1024
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


def peak_flops(device: torch.device, *, dtype: str, autocast_dtype: torch.dtype | None) -> tuple[float | None, str]:
    """(peak FLOP/s per device, source): 'table' for known GPUs, 'measured' otherwise, (None, 'undefined') for fp8."""
    if dtype == "float8":
        return None, "undefined"  # fp8 runs mix fp8 and bf16 matmuls: no single honest peak
    if device.type == "cuda":
        peak = table_peak(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak, "table"
    return measure_peak(device, autocast_dtype), "measured"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
