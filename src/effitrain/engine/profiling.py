"""Profiler on demand: `logging.profile=true` records a torch.profiler trace of a few steps into the run directory.

The trace (`<run>/profile/rank<k>.*.pt.trace.json`) opens in Perfetto (ui.perfetto.dev) or chrome://tracing, and in
TensorBoard's profiler plugin (`tensorboard --logdir <run>/profile`, with torch-tb-profiler installed); rank 0 also
logs the top operators by self time and writes them to `<run>/profile/top_ops.txt`.
Off by default, and then `step()` is one attribute test: the loop pays nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("effitrain")
TOP_OPS = 15  # rows of the operator table


class StepProfiler:
    """Call `step()` once at the end of every optimizer step and `close()` after the loop.

    Args:
        cfg: the `logging` config group (profile, profile_start_step, profile_steps).
        run_dir: the run directory; the trace goes to run_dir/profile.
        rank: this process's rank (each rank writes its own trace; rank 0 prints the table).
        device: the training device (CUDA kernels are recorded too on a GPU).
    """

    def __init__(self, cfg, *, run_dir: Path, rank: int, device):
        self._prof = None
        if not cfg.profile:
            return
        import torch.profiler as tp

        self.directory, self.rank, self.cuda = run_dir / "profile", rank, device.type == "cuda"
        self.first, self.last = cfg.profile_start_step, cfg.profile_start_step + cfg.profile_steps - 1
        # The schedule counts steps from 0; one warm-up step before the window (when there is room) keeps the
        # profiler's own start-up cost out of the recorded steps.
        skip = max(cfg.profile_start_step - 1, 0)
        warmup = min(skip, 1)
        activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = tp.profile(activities=activities, record_shapes=True, with_stack=False,
                                schedule=tp.schedule(wait=skip - warmup, warmup=warmup, active=cfg.profile_steps,
                                                     repeat=1),
                                on_trace_ready=self._ready)
        self._recorded = False
        self._prof.start()

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        if self._prof is None:
            return
        self._prof.stop()  # writes the trace if the run ended inside the window
        if not self._recorded and self.rank == 0:
            log.warning(f"logging.profile: the run ended before step {self.first}; no trace recorded "
                        f"(lower logging.profile_start_step or raise max_steps)")
        self._prof = None

    def _ready(self, prof) -> None:
        import torch.profiler as tp

        self._recorded = True
        self.directory.mkdir(parents=True, exist_ok=True)
        tp.tensorboard_trace_handler(str(self.directory), worker_name=f"rank{self.rank}")(prof)
        if self.rank != 0:
            return
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=TOP_OPS)
        (self.directory / "top_ops.txt").write_text(table + "\n")
        log.info(f"profile of steps {self.first}-{self.last} written to {self.directory} "
                 f"(open the .pt.trace.json in ui.perfetto.dev or `tensorboard --logdir {self.directory}`); "
                 f"top {TOP_OPS} operators by self time:\n{table}")
