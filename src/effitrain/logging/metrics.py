"""Meters (throughput, FLOPs/MFU, memory, timing), the per-step buffer, and sinks (console, JSONL, TensorBoard):
the `logging` group's builder.

Names and units follow DESIGN.md section 4. Every number is measured; where one is undefined
(no peak for fp8) it is null, never invented. Per-step values stay where they were made (device tensors on the
device) until a flush every `logging.every` steps reads them back with one host sync and reduces them across ranks
with one collective; each step still gets its own record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from effitrain.errors import io_failure
from effitrain.files import open_append
from effitrain.logging import GROUP

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


def throughput(*, tokens: int, samples: int, step_time_s: float, data_time_s: float, world_size: int,
               flops_per_token: float, peak_flops: float | None) -> dict:
    """Global and per-device rates for one optimizer step."""
    tps = tokens / step_time_s
    per_device = tps / world_size
    tflops = flops_per_token * per_device / 1e12
    return {
        "step_time_s": step_time_s,
        "data_time_s": data_time_s,
        "data_wait_pct": 100.0 * data_time_s / step_time_s,
        "tokens_per_s": tps,
        "tokens_per_s_per_device": per_device,
        "samples_per_s": samples / step_time_s,
        "tflops_per_device": tflops,
        "mfu_pct": None if peak_flops is None else 100.0 * tflops * 1e12 / peak_flops,
    }


class StepClock:
    """Wall time of each step without a host sync per step: CUDA events on a GPU (read at the flush), the host
    clock on CPU (whose ops complete before they return). Evaluation and metrics between steps are left out."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: list[tuple] = []

    def start(self) -> None:
        self._spans.append((self._now(),))

    def stop(self) -> None:
        self._spans[-1] += (self._now(),)

    def durations(self) -> list[float]:
        """Seconds of each step timed since the last call; on a GPU, waits for the last step's end (the flush's
        one sync)."""
        spans, self._spans = self._spans, []
        if not self.cuda:
            return [b - a for a, b in spans]
        spans[-1][1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in spans]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


@dataclass
class PendingStep:
    """One step's values as the loop made them: device tensors (not read back yet) and host numbers."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    loss_scale: torch.Tensor | None  # fp16: the scale after the step
    skipped: torch.Tensor | None  # the update was skipped (fp16: the scaler backed off; else a non-finite norm)
    lr: float
    data_time_s: float
    mem_active_gib: float
    mem_reserved_gib: float
    extra: dict  # values that were read back anyway (validation loss at evaluation steps)


class StepBuffer:
    """Steps waiting for the next flush, and the flush itself: one host sync (reading every buffered device value
    at once) and one collective (an all-gather of every rank's buffered values), then a record per step.

    Args:
        world: the process's World (rank, size, device).
        clock: the StepClock that timed the buffered steps.
        rates: step -> record fields from (step_time_s, data_time_s) (throughput, FLOPs, MFU).
        memory_total: bytes of device (or host) memory, for mem_pct.
        skipped_steps: steps skipped before this buffer's first step (a resumed run's count).
    """

    def __init__(self, *, world, clock: StepClock, rates, memory_total: int, skipped_steps: int = 0):
        self.world, self.clock, self.rates, self.memory_total = world, clock, rates, memory_total
        self.pending: list[PendingStep] = []
        self.skipped_steps = skipped_steps
        self.wait_s = 0.0  # time the flushes spent waiting for the device to finish the buffered steps

    def add(self, step: PendingStep) -> None:
        self.pending.append(step)

    def flush(self) -> list[dict]:
        """The buffered steps' records (empty when nothing is buffered)."""
        if not self.pending:
            return []
        steps, self.pending = self.pending, []
        t0 = time.perf_counter()
        times = self.clock.durations()
        self.wait_s += time.perf_counter() - t0
        records = []
        for p, (loss, step_time, data_time, mem_active, mem_reserved, grad_norm, scale, skipped) in zip(
                steps, self._reduced(steps, times), strict=True):
            record = {"step": p.step, "loss": loss, "lr": p.lr, "grad_norm": grad_norm}
            if p.skipped is not None:
                self.skipped_steps += int(skipped)
            if p.loss_scale is not None:
                record["loss_scale"] = scale
            if p.loss_scale is not None or self.skipped_steps:  # fp16 always; else from the first skipped step
                record["skipped_steps"] = self.skipped_steps
            record |= self.rates(step_time_s=step_time, data_time_s=data_time)
            record |= {"mem_active_peak_gib": mem_active, "mem_reserved_peak_gib": mem_reserved,
                       "mem_pct": 100.0 * mem_reserved * GIB / self.memory_total}
            records.append(record | p.extra)
        return records

    def _reduced(self, steps: list[PendingStep], times: list[float]) -> list[tuple]:
        """Per step: (loss, step_time, data_time) averaged over ranks, the two memory peaks maxed, and grad norm,
        loss scale, skipped (the same on every rank) -- from one [steps, 8] float64 tensor per rank."""
        device = self.world.device
        host = torch.tensor([[t, p.data_time_s, p.mem_active_gib, p.mem_reserved_gib]
                             for p, t in zip(steps, times, strict=True)], dtype=torch.float64)
        zero = torch.zeros((), device=device)
        on_device = torch.stack([torch.stack([p.loss.double(), p.grad_norm.double().to(device),
                                              (zero if p.loss_scale is None else p.loss_scale).double(),
                                              (zero if p.skipped is None else p.skipped).double()])
                                 for p in steps])
        local = torch.cat([on_device[:, :1], host.to(device), on_device[:, 1:]], dim=1)
        if self.world.distributed:
            import torch.distributed as dist

            gathered = [torch.empty_like(local) for _ in range(self.world.size)]
            dist.all_gather(gathered, local)
            every = torch.stack(gathered)  # [ranks, steps, 8]
            local = torch.cat([every[:, :, :3].mean(0), every[:, :, 3:5].amax(0), local[:, 5:]], dim=1)
        return [tuple(row) for row in local.tolist()]  # .tolist(): the flush's one host sync


@GROUP.builder("logging")
def build_sinks(cfg, *, run_dir: Path, total_steps: int, resumed_at: int = 0) -> list:
    """The sinks rank 0 writes to: metrics.jsonl, the console (a line every `every` steps), TensorBoard if asked.

    Args:
        cfg: the `logging` config group.
        run_dir: the run directory.
        total_steps: the run's last step (for the progress bar).
        resumed_at: the step a resumed run continues after (its records up to there are kept), or 0.
    """
    sinks = [JsonlSink(run_dir / "metrics.jsonl", append=resumed_at > 0),
             ConsoleSink(total_steps=total_steps, every=cfg.every, progress=cfg.progress)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", purge_after=resumed_at))
    return sinks


class JsonlSink:
    """metrics.jsonl, one whole line per record. A write the disk refuses (full, or over a size limit) is undone to
    the last whole line and stops the run as an I/O failure (exit 74): one line, not a traceback, not bad input."""

    def __init__(self, path: Path, *, append: bool = False):
        self.path = path
        # unbuffered: each record is one write of its own, so a failed one is the current record, never an
        # earlier one left waiting in a buffer; a rerun replaces, never splices; a resume continues what was kept
        try:
            self._f = open_append(path, binary=True, truncate=not append)  # never through a symlink
            self._f.seek(0, os.SEEK_END)  # tell() is where a refused write is cut back to
        except OSError as e:
            raise io_failure(e, path, doing="opening the metrics file") from None

    def write(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        end = self._f.tell()
        try:
            done = 0
            while done < len(line):  # a raw write may take part of it
                done += self._f.write(line[done:])
        except OSError as e:
            with contextlib.suppress(OSError):
                self._f.truncate(end)  # frees what the cut line took: the file ends at its last whole record
            raise io_failure(e, self.path, doing="writing metrics") from None

    def close(self) -> None:
        self._f.close()


class TensorBoardSink:
    def __init__(self, directory: Path, *, purge_after: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run hides the events a killed one wrote after its checkpoint (they are written again)
        self._w = SummaryWriter(str(directory), purge_step=purge_after + 1 if purge_after else None)

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

        from effitrain.logging import console

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
    parts += [f"{key} {value:.4f}" for key, value in r.items() if key.startswith("val_loss/")]  # data=mix
    parts += [f"{key} {value:.3f}" for key, value in r.items() if key.startswith("task/")]
    return " | ".join(parts)


class Recorder:
    """Fans each step's record out to the sinks and keeps what the summary needs.

    overhead_s collects the host time the trainer spends on metrics (memory stats, buffering, the flush's
    collective, rates, sinks), so that summary.json can show they do not slow the loop."""

    def __init__(self, sinks: list):
        self.sinks = sinks
        self.records: list[dict] = []
        self.overhead_s = 0.0

    def write(self, record: dict) -> None:
        if self.sinks:  # only rank 0 writes, so only rank 0 keeps the history the summary needs
            self.records.append(record)
        for sink in self.sinks:
            sink.write(record)

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
