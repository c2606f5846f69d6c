"""Meters (throughput, FLOPs/MFU, memory, timing) and sinks (console, JSONL, TensorBoard).

Names and units follow DESIGN.md section 4. Every number is measured; where one is undefined
(no peak for fp8) it is null, never invented.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("effitrain")
GIB = 2**30


class MemoryMeter:
    """Peak memory since the last reset: CUDA allocator peaks, or the process's peak RSS on CPU.

    On Linux, writing 5 to /proc/self/clear_refs resets the RSS high-water mark (VmHWM), so CPU
    peaks are per step too; where that is not allowed the peak is since process start (and said so).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" \
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.per_step = device.type == "cuda" or self._can_reset_rss()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.per_step:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peaks_gib(self) -> tuple[float, float]:
        """(active, reserved) peak GiB; on CPU both are the peak resident set size."""
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            return stats.get("active_bytes.all.peak", 0) / GIB, stats.get("reserved_bytes.all.peak", 0) / GIB
        rss = _peak_rss_bytes() / GIB
        return rss, rss

    def percent(self, reserved_gib: float) -> float:
        return 100.0 * reserved_gib * GIB / self.total

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StepTimes:
    step_time_s: float
    data_time_s: float


def throughput(*, tokens: int, samples: int, times: StepTimes, world_size: int, flops_per_token: float,
               peak_flops: float | None) -> dict:
    """Global and per-device rates for one optimizer step."""
    tps = tokens / times.step_time_s
    per_device = tps / world_size
    tflops = flops_per_token * per_device / 1e12
    return {
        "step_time_s": times.step_time_s,
        "data_time_s": times.data_time_s,
        "data_wait_pct": 100.0 * times.data_time_s / times.step_time_s,
        "tokens_per_s": tps,
        "tokens_per_s_per_device": per_device,
        "samples_per_s": samples / times.step_time_s,
        "tflops_per_device": tflops,
        "mfu_pct": None if peak_flops is None else 100.0 * tflops * 1e12 / peak_flops,
    }


class JsonlSink:
    def __init__(self, path: Path):
        self._f = path.open("w", buffering=1)  # a rerun into the same directory replaces, never splices

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._f.close()


class TensorBoardSink:
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(directory))

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._w.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._w.close()


class ConsoleSink:
    """A rich progress bar with ETA and a compact metrics line every `every` steps."""

    def __init__(self, *, total_steps: int, every: int, progress: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from effitrain.logs import console

        self.every, self.total = every, total_steps
        self._bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             console=console(), transient=True, disable=not progress)
        self._task = self._bar.add_task("train", total=total_steps)
        self._bar.start()

    def write(self, record: dict) -> None:
        self._bar.update(self._task, completed=record["step"])
        if record["step"] % self.every == 0 or record["step"] == self.total or "val_loss" in record:
            log.info(format_line(record, self.total))

    def close(self) -> None:
        self._bar.stop()


def format_line(r: dict, total: int) -> str:
    parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.2f}",
             f"{r['tokens_per_s']:,.0f} tok/s", f"{r['step_time_s'] * 1e3:.0f} ms/step"]
    if r.get("mfu_pct") is not None:
        parts.append(f"MFU {r['mfu_pct']:.1f}%")
    parts.append(f"mem {r['mem_reserved_peak_gib']:.2f} GiB")
    if r.get("loss_scale") is not None:
        parts.append(f"scale {r['loss_scale']:.0f}")
    if "val_loss" in r:
        parts.append(f"val_loss {r['val_loss']:.4f} ppl {r['val_ppl']:.1f}")
    return " | ".join(parts)


class Recorder:
    """Fans each step's record out to the sinks and keeps what the summary needs.

    overhead_s collects the time the trainer spends on metrics (memory stats, cross-rank reductions,
    rates, sinks), so that summary.json can show they do not slow the loop."""

    def __init__(self, sinks: list):
        self.sinks = sinks
        self.records: list[dict] = []
        self.overhead_s = 0.0  # time spent here, to show that metrics do not slow the loop

    def write(self, record: dict) -> None:
        t0 = time.perf_counter()
        if self.sinks:  # only rank 0 writes, so only rank 0 keeps the history the summary needs
            self.records.append(record)
        for sink in self.sinks:
            sink.write(record)
        self.overhead_s += time.perf_counter() - t0

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def summarize(records: list[dict], *, warmup_steps: int) -> dict:
    """Medians over the steps after warm-up (all steps if the run is shorter), peaks, final losses."""
    steady = [r for r in records if r["step"] > warmup_steps] or records

    def median(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    vals = [r for r in records if "val_loss" in r]
    warmup = [r["step_time_s"] for r in records if r["step"] <= warmup_steps]
    return {
        "steps": len(records),
        # compile and warm-up show here, kept out of the medians below
        "first_step_time_s": records[0]["step_time_s"] if records else None,
        "warmup_steps": len(warmup),
        "warmup_time_s": sum(warmup),
        "median_tokens_per_s": median("tokens_per_s"),
        "median_tokens_per_s_per_device": median("tokens_per_s_per_device"),
        "median_tflops_per_device": median("tflops_per_device"),
        "median_mfu_pct": median("mfu_pct"),
        "median_step_time_s": median("step_time_s"),
        "median_data_wait_pct": median("data_wait_pct"),
        "mem_active_peak_gib": max((r["mem_active_peak_gib"] for r in records), default=None),
        "mem_reserved_peak_gib": max((r["mem_reserved_peak_gib"] for r in records), default=None),
        "final_loss": records[-1]["loss"] if records else None,
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "final_val_ppl": vals[-1]["val_ppl"] if vals else None,
        "first_val_loss": vals[0]["val_loss"] if vals else None,
    }
