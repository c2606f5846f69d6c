"""The worker: build everything from the composed config, run the loop, close.

Runs in-process for one process, or in each torchrun/elastic worker (`python -m effitrain.train`
under torchrun composes the config itself, like `effitrain train`).
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from effitrain import runs
from effitrain.data.loader import Prefetcher, TrainBatches, WindowSampler, validation_batches
from effitrain.data.prepare import prepare_data
from effitrain.distributed import all_reduce, barrier, close_world, init_world
from effitrain.flops import model_flops_per_token, peak_flops
from effitrain.hostmem import keep_freed_memory
from effitrain.logs import setup_logging
from effitrain.loop import evaluate, train_step
from effitrain.metrics import ConsoleSink, JsonlSink, MemoryMeter, Recorder, StepTimes, TensorBoardSink, throughput
from effitrain.models import build_model, count_params, init_weights
from effitrain.optim import build_optimizer, build_scheduler
from effitrain.parallel import apply_parallel, data_parallel_shard, gradient_sync_skipper
from effitrain.precision import build_precision
from effitrain.profiling import StepProfiler

log = logging.getLogger("effitrain")


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.world = init_world(cfg.device, group=cfg.parallel.strategy != "single")
        setup_logging(run_dir, rank=self.world.rank)
        torch.manual_seed(cfg.seed)
        if cfg.deterministic and self.world.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        torch.use_deterministic_algorithms(cfg.deterministic)  # set both ways: sweep jobs share the process
        if self.world.device.type == "cpu":
            keep_freed_memory(cfg.cpu_keep_freed_memory)  # likewise both ways
        self._build_data()
        self._build_model()
        self._build_optimizer()
        self._build_meters()

    def _build_data(self) -> None:
        cfg = self.cfg
        if self.world.local_rank == 0:  # one builder per node; the others wait for its cache
            self.data = prepare_data(cfg.data)
        barrier(self.world)
        if self.world.local_rank != 0:
            self.data = prepare_data(cfg.data)
        self.shard = data_parallel_shard(cfg.parallel, world=self.world)  # TP ranks of one group share a batch
        sampler = WindowSampler(self.data.tokens.train, seq_len=cfg.data.seq_len, seed=cfg.seed)
        self.batches = TrainBatches(sampler, batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
                                    shard=self.shard)
        self.val_batches = validation_batches(self.data.tokens.val, seq_len=cfg.data.seq_len,
                                              batch_size=cfg.batch_size, num_batches=cfg.eval_batches,
                                              shard=self.shard)

    def _build_model(self) -> None:
        cfg = self.cfg
        # parameters on the meta device: each rank allocates only its shard when apply_parallel materialises
        model = build_model(cfg.model, vocab_size=self.data.tokens.vocab_size, max_seq_len=cfg.data.seq_len,
                            meta=True)
        self.num_params = count_params(model)
        self.flops_per_token = model_flops_per_token(model, seq_len=cfg.data.seq_len)
        self.precision = build_precision(cfg.precision, device=self.world.device)
        model = self.precision.prepare_model(model)  # bf16-pure cast / fp8 linears: before parallel wrapping
        self.model = apply_parallel(model, cfg=cfg.parallel, world=self.world, precision=self.precision,
                                    init=partial(init_weights, cfg=cfg.model, seed=cfg.seed))
        self.no_sync = gradient_sync_skipper(self.model)  # skips gradient reduction on accumulation micro-steps

    def _build_optimizer(self) -> None:
        # offloaded FSDP steps the optimizer on the host copies of the shards
        device = torch.device("cpu") if self.cfg.parallel.offload else self.world.device
        self.optimizer = build_optimizer(self.model, cfg=self.cfg.optimizer, device=device)
        self.scheduler = build_scheduler(self.optimizer, cfg=self.cfg.schedule, max_steps=self.cfg.max_steps)

    def _build_meters(self) -> None:
        cfg, world = self.cfg, self.world
        self.memory = MemoryMeter(world.device)
        self.peak, self.peak_source = peak_flops(world.device, dtype=self.precision.peak_dtype,
                                                 autocast_dtype=self.precision.autocast_dtype)
        self.tokens_per_step = self.batches.global_batch * cfg.data.seq_len
        sinks = []
        if world.is_main:
            sinks = [JsonlSink(self.run_dir / "metrics.jsonl"),
                     ConsoleSink(total_steps=cfg.max_steps, every=cfg.logging.every, progress=cfg.logging.progress)]
            if cfg.logging.tensorboard:
                sinks.append(TensorBoardSink(self.run_dir / "tensorboard"))
        self.recorder = Recorder(sinks)
        if world.is_main:
            runs.write_env(self.run_dir, world=world, data=self.data, peak_flops=self.peak,
                           peak_flops_source=self.peak_source, num_params=self.num_params)
        log.info(f"model {cfg.model.name}: {self.num_params / 1e6:.2f}M parameters, "
                 f"{self.flops_per_token / 1e6:.1f} MFLOPs/token | data {cfg.data.name}: "
                 f"{len(self.data.tokens.train):,} train tokens, vocab {self.data.tokens.vocab_size}")
        log.info(f"global batch {self.batches.global_batch} sequences = {self.tokens_per_step:,} tokens per optimizer "
                 f"step ({cfg.batch_size} x {self.shard.world} data-parallel ranks x {cfg.grad_accum_steps} accum x "
                 f"{cfg.data.seq_len}) | "
                 f"device {world.device} | peak {_fmt_flops(self.peak)} ({self.peak_source})")

    def train(self) -> dict:
        cfg, world = self.cfg, self.world
        prefetch = Prefetcher(self.batches.iterate(0, cfg.max_steps), depth=cfg.data.prefetch,
                              pin=world.device.type == "cuda")
        self.model.train()
        start = time.perf_counter()
        startup_s = runs.seconds_since_launch()
        log.info(f"startup: {startup_s:.1f} s from the command to the first step")
        profiler = StepProfiler(cfg.logging, run_dir=self.run_dir, rank=world.rank, device=world.device)
        for step in range(1, cfg.max_steps + 1):
            meter_start = time.perf_counter()
            self.memory.reset()
            t0 = time.perf_counter()
            self.recorder.overhead_s += t0 - meter_start
            micro = [prefetch.next().to(world.device, non_blocking=True) for _ in range(cfg.grad_accum_steps)]
            data_time = time.perf_counter() - t0
            lr = float(self.scheduler.get_last_lr()[0])  # a tensor under torchao optimizers
            result = train_step(self.model, self.optimizer, micro, precision=self.precision,
                                grad_clip=cfg.grad_clip, no_sync=self.no_sync)
            self.scheduler.step()
            loss, grad_norm = result.loss.item(), result.grad_norm.item()  # .item() waits for the device
            step_end = time.perf_counter()
            times = StepTimes(step_time_s=step_end - t0, data_time_s=data_time)
            record = self._record(step, loss=loss, grad_norm=grad_norm, lr=lr, times=times)
            self.recorder.overhead_s += time.perf_counter() - step_end  # memory stats, reductions, rates
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                record["val_loss"], record["val_ppl"] = evaluate(self.model, self.val_batches,
                                                                 precision=self.precision, device=world.device)
            self.recorder.write(record)
            profiler.step()
        profiler.close()
        return {"wall_time_s": time.perf_counter() - start, "startup_s": startup_s,
                "metrics_overhead_pct": 100.0 * self.recorder.overhead_s / (time.perf_counter() - start)}

    def _record(self, step: int, *, loss: float, grad_norm: float, lr: float, times: StepTimes) -> dict:
        world = self.world
        mem_active, mem_reserved = self.memory.peaks_gib()
        loss, step_time, data_time = all_reduce([loss, times.step_time_s, times.data_time_s], op="mean", world=world)
        mem_active, mem_reserved = all_reduce([mem_active, mem_reserved], op="max", world=world)
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        if self.precision.scaler.is_enabled():
            record["loss_scale"] = self.precision.loss_scale()
            record["skipped_steps"] = self.precision.skipped_steps
        record |= throughput(tokens=self.tokens_per_step, samples=self.batches.global_batch,
                             times=StepTimes(step_time, data_time), world_size=world.size,
                             flops_per_token=self.flops_per_token, peak_flops=self.peak)
        record |= {"mem_active_peak_gib": mem_active, "mem_reserved_peak_gib": mem_reserved,
                   "mem_pct": self.memory.percent(mem_reserved)}
        return record

    def close(self, extra: dict | None) -> None:
        """Release sinks and the process group; write the summary only for a run that finished."""
        self.recorder.close()
        if self.world.is_main and extra is not None:
            runs.write_summary(self.run_dir, self.recorder, warmup_steps=self.cfg.logging.warmup_steps, extra=extra)
        close_world()


def _fmt_flops(peak: float | None) -> str:
    return "undefined" if peak is None else f"{peak / 1e12:.2f} TFLOP/s"


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train one run into run_dir; returns its summary (rank 0) or {} (other ranks)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir)
    extra = None
    try:
        extra = trainer.train()
    finally:  # a failed in-process run (sweep job, test, reproduce) must not leave a process group behind
        trainer.close(extra)
    return runs.read_summary(run_dir) if trainer.world.is_main else {}


def main() -> None:
    """`python -m effitrain.train [overrides]`: the worker entry for torchrun/srun started from outside."""
    from effitrain.launch import worker_main

    worker_main()


if __name__ == "__main__":
    main()
