"""The measured side of `effitrain estimate`: a config's peak memory per rank in a real step, as the estimate
predicts it (scripts/bench_estimate.py's grid and tests/test_estimate.py use it).

Configs run in fresh processes (`python -m effitrain.engine.memprobe OUT CONFIGS`, under torchrun for several
ranks) that build the model, optimizer and layout exactly as `effitrain train` does (train.build_parts on a
start_job) and run STEPS optimizer steps of random tokens (loop.train_step). The measure is allocator-level, not
RSS: the torch profiler's memory events record every CPU allocation and free with the running total of bytes
allocated; a config's peak is the highest total in its measured steps less the total just before its build began,
plus the weights transformers left as views of a memory-mapped .safetensors file (no allocator event records
them). On CUDA: the allocator's own peak (torch.cuda.max_memory_allocated) over the measured steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(config_file: Path, out: Path) -> None:
    """One rank: for each config, build as train does and run STEPS steps, all inside one profiler session.

    The CPU reporter's running total counts every allocation made while the profiler is on, minus its frees, so a
    config's peak is the highest total in its measured steps minus the total just before its build started (what
    earlier configs left behind, freed or not, cancels out)."""
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from effitrain.base.distributed import close_world
    from effitrain.compose import compose_one
    from effitrain.engine.job import start_job
    from effitrain.engine.runtime import seed_everything
    from effitrain.engine.train import build_parts

    book_every_threads_frees()
    configs = json.loads(config_file.read_text())
    cuda_peaks, mapped, rank = [], [], 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for k, overrides in enumerate(configs):
            with record_function(f"bench_config_{k}"):
                cfg = compose_one(overrides)
                job = start_job(cfg)
                world, rank = job.world, job.world.rank
                seed_everything(cfg.seed)
                gen = torch.Generator().manual_seed(job.shard.rank)
                batches = [torch.randint(0, cfg.data.vocab_size, (cfg.batch_size, cfg.data.seq_len + 1),
                                         generator=gen) for _ in range(STEPS)]
                parts = build_parts(cfg, job=job, vocab_size=cfg.data.vocab_size)
                state = parts.state
                for i, batch in enumerate(batches):
                    if world.device.type == "cuda" and i == MEASURED.start:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    with record_function(f"bench_config_{k}_step_{i}"):
                        # the parts' own step: loop.train_step, or a pipeline's schedule (pp, pp-fsdp)
                        parts.train_step(state.model, state.optimizer, [batch.to(world.device)],
                                         precision=parts.precision, grad_clip=cfg.grad_clip, no_sync=parts.no_sync,
                                         converters=state.converters)
                if world.device.type == "cuda":
                    cuda_peaks.append(torch.cuda.max_memory_allocated())
                mapped.append(_file_backed_tensor_bytes())  # after the steps: a teacher loads at the first one
                del parts, state, batches
                gc.collect()
    peaks = cuda_peaks or [p + m for p, m in zip(_profiled_peaks(prof, len(configs)), mapped, strict=True)]
    out.with_name(f"{out.stem}.rank{rank}.json").write_text(json.dumps({"peak_bytes": peaks}))
    close_world()


def book_every_threads_frees() -> None:
    """Make the profiler's running total of CPU bytes subtract frees made on any thread, not only its own.

    c10's CPU memory reporter books an allocation or a free only on a thread the profiler records, unless its
    `caffe2_report_cpu_memory_usage` flag is on. A tensor whose last reference one of gloo's worker threads drops
    (the tensors of a finished collective: FSDP's reduce-scatter inputs, DDP's flat broadcast of the weights) was
    then never subtracted, and the total drifted up by a different amount in each launch: 2-rank FSDP at d128-L4
    read 11.4 -> 33.3 MiB over 12 steps with a flat RSS, 15.63 MiB in every step with the flag on. The flag has
    no Python setter; it is a plain exported bool of libc10 (it also makes c10 log each allocation at INFO, below
    the default log level)."""
    cpu_memory_report_flag().value = True


def cpu_memory_report_flag():
    """c10's `caffe2_report_cpu_memory_usage` flag, as a ctypes bool in libc10 (read and set through `.value`)."""
    import ctypes

    import torch

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    return ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage")


def _file_backed_tensor_bytes() -> int:
    """Bytes of live CPU tensors whose storage is a memory-mapped .safetensors file.

    transformers loads a Hugging Face directory's weights on CPU as views of the mmapped file (a LoRA base, a
    distillation teacher): memory the process holds (its RSS, as page cache) that no allocator event records, so
    the profiler's total misses it. Counted once per storage and added to the config's measured peak."""
    import gc

    import torch

    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # subclasses without a plain storage, FSDP's freed ones
                continue
            if any(a <= ptr < b for a, b in ranges):
                storages[ptr] = storage.nbytes()
    return sum(storages.values())


# steps 4-6 are measured, a config's peak the highest of them (a run must fit its highest step): optimizer state
# exists and zero_grad freed the gradients, as in every later step, and PowerSGD (start_iter 2, the least torch
# allows with error feedback) has compressed once: its error feedback exists. One step is not enough: under TP a
# vocab shard of the logits outlives its async all-gather in some steps and not others (4 MiB of 38 at d128-L4
# batch 8 x 128)
STEPS = 6
MEASURED = range(3, STEPS)


def profiled_events(prof) -> list:
    """Every event of a finished profiler session, nested ones (an op's allocations) included."""
    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    return list(walk(prof.profiler.kineto_results.experimental_event_tree()))


def _profiled_peaks(prof, count: int) -> list[int]:
    """Per config: the highest running total of CPU bytes allocated in its measured steps, less the total at its
    start."""
    import torch

    allocation = torch._C._profiler._EventType.Allocation
    events = profiled_events(prof)
    ranges = {e.name: (e.start_time_ns, e.end_time_ns) for e in events if e.name.startswith("bench_config_")}
    totals = sorted((e.start_time_ns, e.extra_fields.total_allocated) for e in events
                    if e.tag == allocation and e.extra_fields.device.type == "cpu")
    peaks = []
    for k in range(count):
        begin = ranges[f"bench_config_{k}"][0]
        start = ranges[f"bench_config_{k}_step_{MEASURED.start}"][0]
        end = ranges[f"bench_config_{k}_step_{STEPS - 1}"][1]
        baseline = ([t for ts, t in totals if ts < begin] or [0])[-1]
        inside = [t for ts, t in totals if start <= ts <= end] + [t for ts, t in totals if ts < start][-1:]
        peaks.append(max(inside) - baseline)
    return peaks


def measure(configs: list[list[str]], *, nproc: int) -> list[int]:
    """Per config, the max over ranks of the measured peak; all configs in one launch of fresh processes."""
    return [max(ranks) for ranks in measure_ranks(configs, nproc=nproc)]


def measure_ranks(configs: list[list[str]], *, nproc: int) -> list[list[int]]:
    """Per config, each rank's measured peak (by rank): a pipeline's stages differ, and the estimate names its worst
    rank."""
    with tempfile.TemporaryDirectory() as tmp:
        out, listing = Path(tmp) / "peak.json", Path(tmp) / "configs.json"
        listing.write_text(json.dumps(configs))
        script = ["-m", "effitrain.engine.memprobe", str(out), str(listing)]
        if nproc == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={_free_port()}", *script]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"measuring {len(configs)} configs failed:\n{result.stderr[-3000:]}")
        files = sorted(Path(tmp).glob("peak.rank*.json"), key=lambda p: int(p.stem.removeprefix("peak.rank")))
        per_rank = [json.loads(p.read_text())["peak_bytes"] for p in files]
        return [list(values) for values in zip(*per_rank, strict=True)]


def nproc_of(overrides: list[str]) -> int:
    return next((int(o.split("=")[1]) for o in overrides if o.startswith("launcher.nproc_per_node=")), 1)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    worker(Path(sys.argv[2]), Path(sys.argv[1]))
