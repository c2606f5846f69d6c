"""The worker: build every part from the composed config into a TrainState, run the loop from its step, close.

Runs in-process for one process, or in each torchrun/elastic worker; `python -m effitrain.engine.train [overrides]`
under torchrun/srun started from outside composes the config itself, like `effitrain train`.

Build order: data -> model on the meta device -> converters (precision's, then compression's: before parallel
wrapping, so FSDP shards what they made) -> parallel layout -> communication hooks -> optimizer and schedule ->
the checkpoint to continue from (a resumed or restarted run's latest, or checkpoint.resume_from's weights).

The loop saves on the checkpoint group's cadence, stops cleanly on SIGTERM/SIGUSR1 (finish the step, save, exit
75: `errors.Preempted`), and never applies a step whose gradient norm is not finite (nan_policy).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from effitrain import runs
from effitrain.base.converters import ConverterChain
from effitrain.base.distributed import any_rank, barrier, close_world, pick_device, record_failure
from effitrain.base.flops import model_flops_per_token, peak_flops
from effitrain.checkpoint import GROUP as CHECKPOINT
from effitrain.checkpoint.layout import default_root, latest, resolve
from effitrain.compose import GROUP_NAMES
from effitrain.compression.build import Context, build_compression
from effitrain.data import run_chat_template, run_data_config, tokenizer_identity_files
from effitrain.data.loader import Prefetcher, TrainBatches
from effitrain.data.mix import prepare_run_data
from effitrain.engine import export
from effitrain.engine.job import join, start_job
from effitrain.engine.loop import StepResult, evaluate, lm_loss, train_step
from effitrain.engine.profiling import StepProfiler
from effitrain.engine.runtime import job_runtime
from effitrain.engine.state import TrainState
from effitrain.errors import Diverged, Interrupted, Preempted, RunStopped, UsageError
from effitrain.eval.tasks import TaskSuite
from effitrain.files import write_file
from effitrain.logging import setup_logging
from effitrain.logging.metrics import MemoryMeter, PendingStep, Recorder, StepBuffer, StepClock, build_sinks, throughput
from effitrain.model import model_identity
from effitrain.model.build import build_model, count_params, init_weights
from effitrain.model.load import build_pretrained
from effitrain.optimizer.build import build_optimizer
from effitrain.parallel import GROUP as PARALLEL
from effitrain.parallel import PIPELINE, SHARDS_PARAMS, TENSOR_PARALLEL, offloads
from effitrain.parallel.build import apply_parallel, gradient_sync_skipper
from effitrain.parallel.pipeline import Pipeline, build_pipeline
from effitrain.precision import spec as precision_spec
from effitrain.precision.build import Precision, build_precision
from effitrain.precision.emulation import warn_if_emulated
from effitrain.rundir import RunClaim
from effitrain.schedule.build import build_scheduler

log = logging.getLogger("effitrain")


@dataclass
class Parts:
    """The model-side parts of a run, built in the order the module docstring gives."""

    state: TrainState
    precision: Precision
    no_sync: Callable | None  # skips gradient reduction on accumulation micro-steps (DDP, FSDP)
    num_params: int
    flops_per_token: float
    pipeline: Pipeline | None = None  # pp, pp-fsdp: the schedule over this rank's stages, which steps and evaluates

    @property
    def train_step(self) -> Callable:
        """engine.loop.train_step, or the pipeline's (its stages run the step's forward and backward)."""
        if self.pipeline is None:
            return train_step
        return lambda *args, **kwargs: StepResult(*self.pipeline.train_step(*args, **kwargs))

    @property
    def loss(self) -> Callable:
        """(model, batch) -> the batch's mean loss, for evaluation."""
        return self.pipeline.eval_loss if self.pipeline else lm_loss


def _model(cfg, *, vocab_size: int, converters) -> tuple[torch.nn.Module, Callable]:
    """The model on the meta device and the `init` that fills its parameters once sharded: the seeded init, or for
    a model.pretrained run under a layout that shards or splits it (a pipeline's stages), each rank's own slices of
    the checkpoint (model/load.py).
    single and ddp hold the whole model anyway: they load it once, before wrapping."""
    fresh = partial(init_weights, cfg=cfg.model, seed=cfg.seed)
    if cfg.model.pretrained and any(PARALLEL.provides(cfg.parallel, t) for t in (SHARDS_PARAMS, TENSOR_PARALLEL,
                                                                                  PIPELINE)):
        model, sliced = build_pretrained(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.data.seq_len,
                                         converters=converters)
        return model, sliced or fresh
    return build_model(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.data.seq_len, meta=True), fresh


def build_parts(cfg, *, job, vocab_size: int, tokenizer: Path | None = None) -> Parts:
    """Model (on the meta device, then only this rank's shards materialised), converters, parallel layout,
    communication hooks, optimizer and schedule, from the sub-configs of `cfg`.

    Args:
        cfg: the composed config.
        job: the process's Job (engine/job.py: World, degrees, mesh).
        vocab_size: the tokenizer's vocabulary size.
        tokenizer: the run's tokenizer.json (a distillation teacher must share it).
    """
    world = job.world
    precision = build_precision(cfg.precision, device=world.device)
    if world.is_main:  # one line per run, not per rank
        warn_if_emulated(precision)
    context = Context(seed=cfg.seed, world=world, job=job, parallel=cfg.parallel, precision=precision,
                      vocab_size=vocab_size, tokenizer=tokenizer, seq_len=cfg.data.seq_len,
                      tokens_per_step=cfg.batch_size * cfg.grad_accum_steps * cfg.data.seq_len,
                      model_dir=export.model_dir)
    converters = ConverterChain([*precision.converters, *build_compression(cfg.compression, context=context)])
    model, init = _model(cfg, vocab_size=vocab_size, converters=converters)
    num_params, flops = count_params(model), model_flops_per_token(model, seq_len=cfg.data.seq_len)
    model = apply_parallel(converters.convert(model), cfg=cfg.parallel, job=job, precision=precision, init=init)
    converters.comm_hook(model)
    pipeline = build_pipeline(model, cfg=cfg.parallel, job=job, grad_accum_steps=cfg.grad_accum_steps) \
        if PARALLEL.provides(cfg.parallel, PIPELINE) else None
    if pipeline is not None and world.is_main:
        log.info(pipeline.plan.describe())
    total, trainable = count_params(model), sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    # offloaded FSDP steps the optimizer on the host copies of the shards
    optimizer = build_optimizer(model, cfg=cfg.optimizer, param_dtype=precision.spec.param,
                                device=torch.device("cpu") if offloads(cfg.parallel) else world.device)
    scheduler = build_scheduler(optimizer, cfg=cfg.schedule, max_steps=cfg.max_steps)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=precision.scaler,
                       converters=converters, flatten_optimizer=pipeline is not None)
    return Parts(state=state, precision=precision, no_sync=gradient_sync_skipper(model), num_params=num_params,
                 flops_per_token=flops, pipeline=pipeline)


class Trainer:
    """Builds the run's parts (sub-configs to each builder) and trains from `state.step` to `max_steps`.

    Args:
        cfg: the composed config.
        run_dir: the run directory.
        resume: continue from the latest complete checkpoint of the run's checkpoint dir, if there is one.
    """

    def __init__(self, cfg, run_dir: Path, *, resume: bool = False):
        self.cfg, self.run_dir = cfg, run_dir
        self.job = start_job(cfg)
        self.world = self.job.world
        setup_logging(run_dir, rank=self.world.rank)
        self.run_id = _run_identity(run_dir, self.world)
        self._build_data()
        self.parts = build_parts(cfg, job=self.job, vocab_size=self.data.vocab_size,
                                 tokenizer=self.data.tokenizer_dir / "tokenizer.json")
        self.state, self.precision = self.parts.state, self.parts.precision
        self.checkpoint_root = default_root(run_dir, getattr(cfg.checkpoint, "dir", None))
        self.checkpointer = CHECKPOINT.builder_of(cfg.checkpoint.kind)(
            cfg.checkpoint, root=self.checkpoint_root, world=self.world, manifest=self._manifest())
        self._restore(resume)
        self._build_meters()
        self.on_eval: list[Callable[[int, float], None]] = []  # (step, val_loss) after each evaluation; may raise

    def _manifest(self) -> dict:
        """What every checkpoint's manifest.json repeats about the run."""
        import effitrain
        from effitrain.runs import config_hash

        return {"effitrain_version": effitrain.__version__, "run_id": self.run_id, "config_hash": config_hash(self.cfg),
                "world_size": self.world.size, "strategy": self.cfg.parallel.strategy}

    def _restore(self, resume: bool) -> None:
        """Load the checkpoint this run continues from (resumed: its own newest that verifies, see
        store.resume_latest); a resumed run keeps its metrics up to that step."""
        from effitrain.checkpoint.store import load_checkpoint, resume_latest

        self.kept_records: list[dict] = []
        t0 = time.perf_counter()
        found = resume_latest(self.state, self.checkpoint_root, run_id=self.run_id, world=self.world) if resume \
            else None
        if found is not None:
            path, manifest = found
            log.info(f"resumed from {path} at step {self.state.step} (loaded in {time.perf_counter() - t0:.2f} s; "
                     f"checksums verified in {manifest['verify_s']:.2f} s)")
            if self.world.is_main:
                self.kept_records = runs.truncate_metrics(self.run_dir, step=self.state.step)
                (self.run_dir / runs.PREEMPTED).unlink(missing_ok=True)
            return
        source, with_optimizer = self.cfg.checkpoint.resume_from, self.cfg.checkpoint.load_optimizer
        if source:
            path = resolve(source)
            what = "weights+optimizer" if with_optimizer else "weights"
            load_checkpoint(self.state, path, world=self.world, what=what)
            log.info(f"starting from the {what} of {path}")
        if resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
            log.info(f"restarted before any checkpoint was complete in {self.checkpoint_root}: from step 0 again")

    def _build_data(self) -> None:
        cfg, world = self.cfg, self.world
        self.data_cfg = run_data_config(cfg)  # model.pretrained: its own tokenizer by default
        if world.local_rank == 0:  # one builder per node; the others wait for its cache
            self.data = prepare_run_data(self.data_cfg)
        barrier(world)
        if world.local_rank != 0:
            self.data = prepare_run_data(self.data_cfg)
        self.shard = self.job.shard  # TP ranks of one group share a batch
        self.sampler = self.data.sampler(seq_len=cfg.data.seq_len, seed=cfg.seed)  # data=mix: by the weights
        self.batches = TrainBatches(self.sampler, batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
                                    shard=self.shard)
        self.val_batches = self.data.validation(seq_len=cfg.data.seq_len, batch_size=cfg.batch_size,
                                                num_batches=cfg.eval_batches, shard=self.shard)  # {source: batches}
        self.tasks = TaskSuite(list(cfg.eval.tasks), max_items=cfg.eval.task_items,
                               tokenizer_dir=self.data.tokenizer_dir)

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
            sinks = build_sinks(cfg.logging, run_dir=self.run_dir, total_steps=cfg.max_steps,
                                resumed_at=self.state.step if self.kept_records else 0)
            data_env = self.data.env(self.sampler, samples=cfg.max_steps * self.batches.global_batch,
                                     seq_len=cfg.data.seq_len)
            runs.write_env(self.run_dir, world=world, data=data_env, peak_flops=self.peak,
                           peak_flops_source=self.peak_source, num_params=self.parts.num_params,
                           model=model_identity(cfg.model))
            # the run directory carries its tokenizer: export and sample need no corpus and no cache
            write_file(self.run_dir / "tokenizer.json", (self.data.tokenizer_dir / "tokenizer.json").read_bytes())
            # and a given tokenizer's identity (tokenizer_config.json...), which its export carries
            for name in tokenizer_identity_files(self.data_cfg.tokenizer):
                write_file(self.run_dir / name.name, name.read_bytes())
            template = run_chat_template(cfg)  # the template conversations rendered with: the export carries it
            if template is not None:
                write_file(self.run_dir / "chat_template.jinja", template.encode())
            write_file(self.run_dir / "data_report.json", json.dumps(self.data.report(), indent=2))  # data.clean's
        self.recorder = Recorder(sinks)
        self.recorder.records = list(self.kept_records)  # a resumed run's summary spans all its steps
        options = " ".join(f"{group}={cfg[group].name}" for group in GROUP_NAMES if "name" in cfg[group])
        log.info(f"run {cfg.name}: {options}")
        log.info(f"model {model_identity(cfg.model)['name']}: {self.parts.num_params / 1e6:.2f}M parameters, "
                 f"{self.parts.flops_per_token / 1e6:.1f} MFLOPs/token | data {cfg.data.name}: "
                 f"{self.data.train_tokens:,} train tokens, vocab {self.data.vocab_size}")
        log.info(f"global batch {self.batches.global_batch} sequences = {self.tokens_per_step:,} tokens per optimizer "
                 f"step ({cfg.batch_size} x {self.shard.world} data-parallel ranks x {cfg.grad_accum_steps} accum x "
                 f"{cfg.data.seq_len}) | device {world.device} | peak {_fmt_flops(self.peak)} ({self.peak_source})")

    def train(self, *, until: int | None = None) -> dict:
        """Steps state.step + 1 .. `until` (default max_steps; the schedule still spans max_steps); the summary's
        timing fields. Raises Preempted (after saving) on SIGTERM/SIGUSR1, Diverged under nan_policy=abort."""
        cfg, state = self.cfg, self.state
        last = until or cfg.max_steps
        prefetch = Prefetcher(self.batches.iterate(state.step, last), depth=cfg.data.prefetch,
                              pin=self.world.device.type == "cuda")
        state.model.train()
        profiler = StepProfiler(cfg.logging, run_dir=self.run_dir, rank=self.world.rank, device=self.world.device)
        startup_s = runs.seconds_since_launch()
        log.info(f"startup: {startup_s:.1f} s from the command to the first step")
        # built here, not with the meters: a loaded TrainState brings the count of steps skipped so far
        self.buffer = StepBuffer(world=self.world, clock=self.clock, rates=self.rates, memory_total=self.memory.total,
                                 skipped_steps=state.skipped_steps)
        self._scale = self.precision.loss_scale()  # fp16: the (restored) scale the first step starts from
        self._nonfinite = 0  # consecutive steps whose gradient norm was not finite
        self._nan_policy, self._nan_patience = cfg.nan_policy, cfg.nan_patience
        start = time.perf_counter()
        with StopSignals(self.run_dir) as stop:
            for step in range(state.step + 1, last + 1):
                self._step(step, prefetch)
                profiler.step()
                self._after_step(step, stop_requested=stop.requested)
        t0 = time.perf_counter()
        self._flush()  # a loop that stops between flushes (until=) still writes every step
        self.recorder.overhead_s += time.perf_counter() - t0
        if self.checkpointer is not None:
            self.checkpointer.wait()  # the final save is complete before the run reports done
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
        result = self.parts.train_step(state.model, state.optimizer, micro, precision=self.precision,
                                       grad_clip=cfg.grad_clip, no_sync=self.parts.no_sync, converters=state.converters)
        state.scheduler.step()
        state.step, state.tokens_seen = step, state.tokens_seen + self.tokens_per_step
        self.clock.stop()
        t2 = time.perf_counter()
        active, reserved = self.memory.peaks_gib()
        t3 = time.perf_counter()
        extra = {}
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            extra |= self.data.evaluate(self.val_batches, loss_of=lambda batches: evaluate(
                state.model, batches, precision=self.precision, device=world.device, loss=self.parts.loss)[0])
            extra |= self.tasks.scores(state.model, max_len=cfg.data.seq_len, precision=self.precision,
                                       device=world.device)
        t4 = time.perf_counter()
        scale_before, scale = self._scale, self.precision.loss_scale()
        self._scale = scale
        # the scaler backs off exactly on the steps it skips, so compare on the device; other precisions skip
        # exactly the non-finite steps
        skipped = (scale < scale_before if scale is not None
                   else None if result.finite else torch.ones((), device=world.device))
        self.buffer.add(PendingStep(step=step, loss=result.loss, grad_norm=result.grad_norm, loss_scale=scale,
                                    skipped=skipped, lr=lr, data_time_s=data_time, mem_active_gib=active,
                                    mem_reserved_gib=reserved, extra=extra | state.converters.metrics()
                                    | (self.parts.pipeline.last_metrics if self.parts.pipeline else {})
                                    | (result.router.metrics() if result.router else {})))
        if step % cfg.logging.every == 0 or step == cfg.max_steps or extra:
            self._flush()
        for hook in self.on_eval if extra else ():  # after the flush: a hook that stops the run keeps this step
            hook(step, extra["val_loss"])
        # metrics' own host time: memory stats, buffering, the flush's collective and the sinks (not the evaluation)
        self.recorder.overhead_s += (t1 - t0) + (t3 - t2) + (time.perf_counter() - t4)
        self._count_nonfinite(step, finite=result.finite)

    def _count_nonfinite(self, step: int, *, finite: bool) -> None:
        self._nonfinite = 0 if finite else self._nonfinite + 1
        if self._nonfinite and self._nan_policy == "abort" and self._nonfinite >= self._nan_patience:
            self._flush()
            good = latest(self.checkpoint_root)
            raise Diverged(f"the gradient norm was not finite for {self._nonfinite} consecutive steps "
                           f"({step - self._nonfinite + 1}-{step}; none was applied): stopped (nan_policy=abort); "
                           + (f"the last good checkpoint is {good}" if good else "no checkpoint was saved"))

    def _after_step(self, step: int, *, stop_requested: bool) -> None:
        """Checkpoint when due (never mid-way through a non-finite streak), or save and stop when a signal came."""
        ckpt = self.checkpointer
        if ckpt is not None:
            ckpt.poll()
        if any_rank(stop_requested, self.world):
            self._flush()
            message = f"stopped by a signal after step {step}"
            if ckpt is not None:
                ckpt.save(self.state, blocking=True)
                message += f"; saved {ckpt.root / f'step-{step}'}: continue with effitrain resume {self.run_dir}"
            else:
                message += "; nothing saved (checkpoint=off): a rerun starts again from step 0"
            if self.world.is_main:
                runs.write_preempted(self.run_dir, step=step, message=message)
            raise Preempted(message)
        if ckpt is not None and self._nonfinite == 0 and ckpt.due(step, last=self.cfg.max_steps):
            self._flush()  # the checkpoint's counters (skipped steps) and metrics.jsonl reach this step first
            ckpt.save(self.state, final=step == self.cfg.max_steps)

    def _flush(self) -> None:
        for record in self.buffer.flush():
            self.recorder.write(record)
        self.state.skipped_steps = self.buffer.skipped_steps

    def close(self, extra: dict | None, *, together: bool = True) -> None:
        """Release sinks, checkpoint writer and the process group; write the summary only for a run that finished.
        together=False: this rank may be failing alone (base.distributed.close_world)."""
        self.recorder.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.world.is_main and extra is not None:
            runs.write_summary(self.run_dir, self.recorder, warmup_steps=self.cfg.logging.warmup_steps, extra=extra)
        close_world(together=together)


class StopSignals:
    """SIGTERM, SIGUSR1 (SLURM sends one before it kills a job) and a first Ctrl-C (SIGINT) ask the loop to stop after
    the current step (save, exit 75); a second Ctrl-C stops at once (Interrupted, exit 130: the latest complete
    checkpoint stays the one to resume from). The previous handlers come back when the loop ends. Only the main
    thread can own signal handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, run_dir: Path):
        self.requested, self.previous, self.run_dir, self.interrupts = False, {}, run_dir, 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}
        return self

    def _request(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # raised between two Python operations; a save in flight stays a .tmp
                raise Interrupted(f"interrupted twice: stopped at once without saving; effitrain resume "
                                  f"{self.run_dir} continues from the latest complete checkpoint")
        if not self.requested:
            again = " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""
            log.warning(f"{signal.Signals(signum).name}: stopping after this step (saving a checkpoint first){again}")
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _run_identity(run_dir: Path, world) -> str:
    """The run's id, which its checkpoints carry: rundir's, written by rank 0 where the command's claim has not
    written one (a test or benchmark calling `run`, a worker torchrun started from outside)."""
    from effitrain.rundir import ensure_run_id, run_id

    if world.is_main:
        ensure_run_id(run_dir)
    barrier(world)
    found = run_id(run_dir)
    if found is None:
        raise UsageError(f"{run_dir}/.effitrain/run.json cannot be read on rank {world.rank}: every rank must see "
                         "the run directory")
    return found


def _fmt_flops(peak: float | None) -> str:
    return "undefined" if peak is None else f"{peak / 1e12:.2f} TFLOP/s"


def run(cfg, run_dir: Path, *, resume: bool = False, on_eval=()) -> dict:
    """Train one run into run_dir; returns its summary (rank 0) or {} (other ranks).

    Args:
        resume: continue from the run's latest complete checkpoint; workers the elastic agent restarted
            (launcher.max_restarts) always do.
        on_eval: Trainer.on_eval hooks (a search's pruning).
    """
    trainer = train_here(cfg, run_dir, resume=resume, on_eval=on_eval)
    return runs.read_summary(run_dir) if trainer.world.is_main else {}


def launch(cfg, run_dir: Path, *, resume: bool = False, on_eval=()) -> dict:
    """Train `cfg` into run_dir with the launch shape its `launcher` group asks for: in this process (world size 1,
    or already a torchrun worker), else the launcher's workers, each running `run_container`; the summary.

    Args:
        resume: continue from run_dir's latest complete checkpoint (`effitrain resume`); restarted workers
            (launcher.max_restarts) always do.
        on_eval: functions called with (step, val_loss) after each evaluation (a search's pruning); they run in
            this process, so only a job of one process takes them.
    """
    from effitrain.launcher import GROUP as LAUNCHER
    from effitrain.launcher import in_torchrun_worker, world_size

    if world_size(cfg.launcher) == 1 or in_torchrun_worker():
        return run(cfg, run_dir, resume=resume, on_eval=on_eval)
    if on_eval:
        raise UsageError("a pruned search runs each trial in one process: launcher.nproc_per_node=1, "
                         "launcher.nnodes=1 (or no hydra.sweeper.pruner)")
    return LAUNCHER.builder_of("launcher")(cfg, run_dir, entry=run_container, resume=resume)


def run_container(container: dict, run_dir: Path, *, resume: bool = False) -> dict:
    """`run` of a config that crossed a process boundary as a plain container (an elastic worker's), typed again."""
    from effitrain.compose import typed

    return run(typed(container), run_dir, resume=resume)


def train_here(cfg, run_dir: Path, *, resume: bool = False, on_eval=()) -> Trainer:
    """`run` in this process, returning the Trainer after its last step: its model and converters stay
    inspectable (tests, benchmarks)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    with job_runtime(seed=cfg.seed, deterministic=cfg.deterministic, tf32=precision_spec(cfg.precision).tf32,
                     device=device,
                     keep_freed=cfg.cpu_keep_freed_memory):
        trainer = Trainer(cfg, run_dir, resume=resume or restarted)
        trainer.on_eval.extend(on_eval)
        extra, together = None, True
        try:
            extra = trainer.train()
        except BaseException as e:
            # every rank stops together after a signal (any_rank) or a divergence (a global grad norm); any other
            # failure may be this rank's alone: its error is recorded for torchrun before the group is aborted
            together = isinstance(e, (Preempted, Diverged))
            if not together and not isinstance(e, (UsageError, RunStopped)):  # those are reported as stops
                record_failure(e)
            raise
        finally:  # a failed in-process run (sweep job, test, reproduce) must not leave a process group behind
            trainer.close(extra, together=together)
    return trainer


def main(args: list[str] | None = None) -> None:
    """`python -m effitrain.engine.train [overrides]`: the worker entry for torchrun/srun started from outside.

    Every rank composes the same config; rank 0 makes the run directory `hydra.run.dir` names and broadcasts its
    path. The launch shape is torchrun's, not the launcher group's: it is recorded, so checks and reproduce see the
    truth. Bad input: one line, exit 2; a stop (preemption: 75, divergence: 1): one line."""
    from effitrain.checks import check_all
    from effitrain.compose import compose_one, normalize
    from effitrain.errors import RunStopped, UsageError, exit_one_line

    runs.mark_launch()
    overrides = normalize(sys.argv[1:] if args is None else args)
    try:
        if any(a in ("-m", "--multirun") for a in overrides):
            raise UsageError("python -m effitrain.engine.train runs one job; sweep with effitrain train -m")
        cfg = compose_one(overrides, hydra=True)
        cfg.launcher.nproc_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cfg.launcher.nnodes = int(os.environ.get("WORLD_SIZE", 1)) // cfg.launcher.nproc_per_node
        check_all(cfg)
        run(cfg, _shared_run_dir(cfg, overrides), resume=True)  # a torchrun restart continues its run dir
    except (UsageError, RunStopped) as e:
        exit_one_line(e)


def _shared_run_dir(cfg, overrides: list[str]) -> Path:
    """Rank 0 makes the run directory; every rank gets its path (ranks may start in different seconds)."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    world = join(cfg)
    box = [None]
    if world.is_main:  # rank 0 holds the directory for the job's life: new, empty, or its own run (a restart)
        global _CLAIM
        _CLAIM = RunClaim(Path(OmegaConf.select(cfg, "hydra.run.dir")), mode="continue")
        box = [str(runs.new_run_dir(cfg, overrides))]
    if world.distributed:
        dist.broadcast_object_list(box, src=0)
    return Path(box[0])


_CLAIM: RunClaim | None = None  # rank 0's hold on the run directory of `python -m effitrain.engine.train`


if __name__ == "__main__":
    main()
