"""The worker: build every part from the composed config into a TrainState, run the loop from its step, close.

Runs in-process for one process, or in each torchrun/elastic worker; `python -m effitrain.train [overrides]` under
torchrun/srun started from outside composes the config itself, like `effitrain train`.

Build order: data -> model on the meta device -> converters (precision's, then compression's: before parallel
wrapping, so FSDP shards what they made) -> parallel layout -> communication hooks -> optimizer and schedule.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from effitrain import runs
from effitrain.compose import GROUP_NAMES
from effitrain.compression.build import Context, build_compression
from effitrain.converters import ConverterChain
from effitrain.data.loader import Prefetcher, TrainBatches, WindowSampler, validation_batches
from effitrain.data.prepare import prepare_data
from effitrain.distributed import barrier, close_world, init_world, pick_device
from effitrain.flops import model_flops_per_token, peak_flops
from effitrain.logs import setup_logging
from effitrain.loop import evaluate, train_step
from effitrain.metrics import MemoryMeter, PendingStep, Recorder, StepBuffer, StepClock, build_sinks, throughput
from effitrain.models.build import build_model, count_params, init_weights
from effitrain.optim.build import build_optimizer
from effitrain.parallel import offloads
from effitrain.parallel.build import apply_parallel, data_parallel_shard, gradient_sync_skipper
from effitrain.precision.build import Precision, build_precision
from effitrain.profiling import StepProfiler
from effitrain.runtime import job_runtime
from effitrain.schedule.build import build_scheduler
from effitrain.state import TrainState

log = logging.getLogger("effitrain")


@dataclass
class Parts:
    """The model-side parts of a run, built in the order the module docstring gives."""

    state: TrainState
    precision: Precision
    no_sync: Callable | None  # skips gradient reduction on accumulation micro-steps (DDP, FSDP)
    num_params: int
    flops_per_token: float


def build_parts(cfg, *, world, vocab_size: int, tokenizer: Path | None = None) -> Parts:
    """Model (on the meta device, then only this rank's shards materialised), converters, parallel layout,
    communication hooks, optimizer and schedule, from the sub-configs of `cfg`.

    Args:
        cfg: the composed config.
        world: the process's World (rank, size, device).
        vocab_size: the tokenizer's vocabulary size.
        tokenizer: the run's tokenizer.json (a distillation teacher must share it).
    """
    model = build_model(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.data.seq_len, meta=True)
    num_params, flops = count_params(model), model_flops_per_token(model, seq_len=cfg.data.seq_len)
    precision = build_precision(cfg.precision, device=world.device)
    context = Context(seed=cfg.seed, world=world, parallel=cfg.parallel, precision=precision, vocab_size=vocab_size,
                      tokenizer=tokenizer, seq_len=cfg.data.seq_len,
                      tokens_per_step=cfg.batch_size * cfg.grad_accum_steps * cfg.data.seq_len)
    converters = ConverterChain([*precision.converters, *build_compression(cfg.compression, context=context)])
    model = apply_parallel(converters.convert(model), cfg=cfg.parallel, world=world, precision=precision,
                           init=partial(init_weights, cfg=cfg.model, seed=cfg.seed))
    converters.comm_hook(model)
    total, trainable = count_params(model), sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    # offloaded FSDP steps the optimizer on the host copies of the shards
    optimizer = build_optimizer(model, cfg=cfg.optimizer,
                                device=torch.device("cpu") if offloads(cfg.parallel) else world.device)
    scheduler = build_scheduler(optimizer, cfg=cfg.schedule, max_steps=cfg.max_steps)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=precision.scaler,
                       converters=converters)
    return Parts(state=state, precision=precision, no_sync=gradient_sync_skipper(model), num_params=num_params,
                 flops_per_token=flops)


class Trainer:
    """Builds the run's parts (sub-configs to each builder) and trains from `state.step` to `max_steps`."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.world = init_world(cfg.device, group=cfg.parallel.strategy != "single")
        setup_logging(run_dir, rank=self.world.rank)
        self._build_data()
        self.parts = build_parts(cfg, world=self.world, vocab_size=self.data.tokens.vocab_size,
                                 tokenizer=self.data.tokens.directory / "tokenizer.json")
        self.state, self.precision = self.parts.state, self.parts.precision
        self._build_meters()

    def _build_data(self) -> None:
        cfg, world = self.cfg, self.world
        if world.local_rank == 0:  # one builder per node; the others wait for its cache
            self.data = prepare_data(cfg.data)
        barrier(world)
        if world.local_rank != 0:
            self.data = prepare_data(cfg.data)
        self.shard = data_parallel_shard(cfg.parallel, world=world)  # TP ranks of one group share a batch
        sampler = WindowSampler(self.data.tokens.train, seq_len=cfg.data.seq_len, seed=cfg.seed)
        self.batches = TrainBatches(sampler, batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
                                    shard=self.shard)
        self.val_batches = validation_batches(self.data.tokens.val, seq_len=cfg.data.seq_len,
                                              batch_size=cfg.batch_size, num_batches=cfg.eval_batches,
                                              shard=self.shard)

    def _build_meters(self) -> None:
        cfg, world = self.cfg, self.world
        self.memory = MemoryMeter(world.device)
        self.peak, self.peak_source = peak_flops(world.device, dtype=self.precision.peak_dtype,
                                                 autocast_dtype=self.precision.autocast_dtype)
        self.tokens_per_step = self.batches.global_batch * cfg.data.seq_len
        rates = partial(throughput, tokens=self.tokens_per_step, samples=self.batches.global_batch,
                        world_size=world.size, flops_per_token=self.parts.flops_per_token, peak_flops=self.peak)
        self.clock = StepClock(world.device)
        self.rates = rates
        sinks = []
        if world.is_main:
            sinks = build_sinks(cfg.logging, run_dir=self.run_dir, total_steps=cfg.max_steps)
            runs.write_env(self.run_dir, world=world, data=self.data, peak_flops=self.peak,
                           peak_flops_source=self.peak_source, num_params=self.parts.num_params)
        self.recorder = Recorder(sinks)
        options = " ".join(f"{group}={cfg[group].name}" for group in GROUP_NAMES if "name" in cfg[group])
        log.info(f"run {cfg.name}: {options}")
        log.info(f"model {cfg.model.name}: {self.parts.num_params / 1e6:.2f}M parameters, "
                 f"{self.parts.flops_per_token / 1e6:.1f} MFLOPs/token | data {cfg.data.name}: "
                 f"{len(self.data.tokens.train):,} train tokens, vocab {self.data.tokens.vocab_size}")
        log.info(f"global batch {self.batches.global_batch} sequences = {self.tokens_per_step:,} tokens per optimizer "
                 f"step ({cfg.batch_size} x {self.shard.world} data-parallel ranks x {cfg.grad_accum_steps} accum x "
                 f"{cfg.data.seq_len}) | device {world.device} | peak {_fmt_flops(self.peak)} ({self.peak_source})")

    def train(self, *, until: int | None = None) -> dict:
        """Steps state.step + 1 .. `until` (default max_steps; the schedule still spans max_steps); the summary's
        timing fields."""
        cfg, state = self.cfg, self.state
        prefetch = Prefetcher(self.batches.iterate(state.step, until or cfg.max_steps), depth=cfg.data.prefetch,
                              pin=self.world.device.type == "cuda")
        state.model.train()
        profiler = StepProfiler(cfg.logging, run_dir=self.run_dir, rank=self.world.rank, device=self.world.device)
        startup_s = runs.seconds_since_launch()
        log.info(f"startup: {startup_s:.1f} s from the command to the first step")
        # built here, not with the meters: a loaded TrainState brings the count of fp16 steps skipped so far
        self.buffer = StepBuffer(world=self.world, clock=self.clock, rates=self.rates, memory_total=self.memory.total,
                                 skipped_steps=state.skipped_steps)
        self._scale = self.precision.loss_scale()  # fp16: the (restored) scale the first step starts from
        start = time.perf_counter()
        for step in range(state.step + 1, (until or cfg.max_steps) + 1):
            self._step(step, prefetch)
            profiler.step()
        t0 = time.perf_counter()
        self._flush()  # a loop that stops between flushes (until=) still writes every step
        self.recorder.overhead_s += time.perf_counter() - t0
        profiler.close()
        wall = time.perf_counter() - start
        # metrics' own host time: not the flushes' wait for the device to finish the steps they read
        overhead = self.recorder.overhead_s - self.buffer.wait_s
        return {"wall_time_s": wall, "startup_s": startup_s, "metrics_overhead_pct": 100.0 * overhead / wall}

    def _step(self, step: int, prefetch: Prefetcher) -> None:
        cfg, state, world = self.cfg, self.state, self.world
        t0 = time.perf_counter()
        self.memory.reset()
        self.clock.start()
        t1 = time.perf_counter()
        micro = [prefetch.next().to(world.device, non_blocking=True) for _ in range(cfg.grad_accum_steps)]
        data_time = time.perf_counter() - t1
        lr = float(state.scheduler.get_last_lr()[0])  # a host float (a CPU tensor under torchao optimizers)
        result = train_step(state.model, state.optimizer, micro, precision=self.precision, grad_clip=cfg.grad_clip,
                            no_sync=self.parts.no_sync, converters=state.converters)
        state.scheduler.step()
        state.step, state.tokens_seen = step, state.tokens_seen + self.tokens_per_step
        self.clock.stop()
        t2 = time.perf_counter()
        active, reserved = self.memory.peaks_gib()
        t3 = time.perf_counter()
        extra = {}
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            extra["val_loss"], extra["val_ppl"] = evaluate(state.model, self.val_batches, precision=self.precision,
                                                           device=world.device)
        t4 = time.perf_counter()
        scale_before, scale = self._scale, self.precision.loss_scale()
        self._scale = scale
        # the scaler backs off exactly on the steps it skips; compared on the device: no sync
        skipped = None if scale is None else scale < scale_before
        self.buffer.add(PendingStep(step=step, loss=result.loss, grad_norm=result.grad_norm, loss_scale=scale,
                                    skipped=skipped, lr=lr, data_time_s=data_time, mem_active_gib=active,
                                    mem_reserved_gib=reserved, extra=extra | state.converters.metrics()))
        if step % cfg.logging.every == 0 or step == cfg.max_steps or extra:
            self._flush()
        # metrics' own host time: memory stats, buffering, the flush's collective and the sinks (not the evaluation)
        self.recorder.overhead_s += (t1 - t0) + (t3 - t2) + (time.perf_counter() - t4)

    def _flush(self) -> None:
        for record in self.buffer.flush():
            self.recorder.write(record)
        self.state.skipped_steps = self.buffer.skipped_steps

    def close(self, extra: dict | None) -> None:
        """Release sinks and the process group; write the summary only for a run that finished."""
        self.recorder.close()
        if self.world.is_main and extra is not None:
            runs.write_summary(self.run_dir, self.recorder, warmup_steps=self.cfg.logging.warmup_steps, extra=extra)
        close_world()


def _fmt_flops(peak: float | None) -> str:
    return "undefined" if peak is None else f"{peak / 1e12:.2f} TFLOP/s"


def run(cfg, run_dir: Path) -> dict:
    """Train one run into run_dir; returns its summary (rank 0) or {} (other ranks)."""
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    with job_runtime(seed=cfg.seed, deterministic=cfg.deterministic, tf32=cfg.precision.tf32, device=device,
                     keep_freed=cfg.cpu_keep_freed_memory):
        trainer = Trainer(cfg, run_dir)
        extra = None
        try:
            extra = trainer.train()
        finally:  # a failed in-process run (sweep job, test, reproduce) must not leave a process group behind
            trainer.close(extra)
    return runs.read_summary(run_dir) if trainer.world.is_main else {}


def main(args: list[str] | None = None) -> None:
    """`python -m effitrain.train [overrides]`: the worker entry for torchrun/srun started from outside.

    Every rank composes the same config; rank 0 makes the run directory `hydra.run.dir` names and broadcasts its
    path. The launch shape is torchrun's, not the launcher group's: it is recorded, so checks and reproduce see the
    truth. Bad input: one line, exit 2."""
    import os

    from effitrain.checks import check_all
    from effitrain.compose import compose_one, normalize
    from effitrain.errors import UsageError

    runs.mark_launch()
    overrides = normalize(sys.argv[1:] if args is None else args)
    try:
        if any(a in ("-m", "--multirun") for a in overrides):
            raise UsageError("python -m effitrain.train runs one job; sweep with effitrain train -m")
        cfg = compose_one(overrides, hydra=True)
        cfg.launcher.nproc_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cfg.launcher.nnodes = int(os.environ.get("WORLD_SIZE", 1)) // cfg.launcher.nproc_per_node
        check_all(cfg)
        run(cfg, _shared_run_dir(cfg, overrides))
    except UsageError as e:
        print(f"effitrain: error: {e}", file=sys.stderr)
        sys.exit(2)


def _shared_run_dir(cfg, overrides: list[str]) -> Path:
    """Rank 0 makes the run directory; every rank gets its path (ranks may start in different seconds)."""
    import torch.distributed as dist

    world = init_world(cfg.device, group=cfg.parallel.strategy != "single")
    box = [str(runs.new_run_dir(cfg, overrides)) if world.is_main else None]
    if world.distributed:
        dist.broadcast_object_list(box, src=0)
    return Path(box[0])


if __name__ == "__main__":
    main()
