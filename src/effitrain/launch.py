"""Launching, the `launcher` group's builder: a composed config -> this process (world size 1, or already a torchrun
worker) or torchrun workers.

Workers are started by torch's elastic agent (`elastic_launch`, the engine behind torchrun) with the
composed config handed to a Python function: nothing is re-parsed from argv, so every rank trains
exactly the config the CLI checked.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from effitrain.errors import UsageError
from effitrain.launcher import GROUP, in_torchrun_worker, world_size

log = logging.getLogger("effitrain")


class WorkerFailed(RuntimeError):
    """A worker process died or raised: the job was stopped; the message names the failing rank."""


def launch(cfg, run_dir: Path, *, on_eval=()) -> dict:
    """Train `cfg` into run_dir with the launch shape its `launcher` group asks for; returns the summary.

    Args:
        on_eval: functions called with (step, val_loss) after each evaluation (a search's pruning); they run in
            this process, so only a job of one process takes them.
    """
    from effitrain.train import run

    if world_size(cfg.launcher) == 1 or in_torchrun_worker():
        return run(cfg, run_dir, on_eval=on_eval)
    if on_eval:
        raise UsageError("a pruned search runs each trial in one process: launcher.nproc_per_node=1, "
                         "launcher.nnodes=1 (or no hydra.sweeper.pruner)")
    return GROUP.builder_of("launcher")(cfg, run_dir)


@GROUP.builder("launcher")
def launch_workers(cfg, run_dir: Path) -> dict:
    """Start the workers under torch's elastic agent and wait for them; rank 0's summary."""
    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from effitrain.runs import read_summary

    config = launch_config(cfg.launcher, device=cfg.device)
    # the agent logs each failure as a wall of text; _failure_message says it once, with the rank
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if config.start_method == "forkserver":
        _preload_forkserver()
    run_dir.mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        results = elastic_launch(config, _worker)(container, str(run_dir))
    except ChildFailedError as e:
        raise WorkerFailed(_failure_message(e)) from None
    errors = [r for r in results.values() if isinstance(r, str)]
    if errors:  # bad input found only once the data was read: still a usage error (exit 2)
        raise UsageError(errors[0])
    return read_summary(run_dir)


def launch_config(lc, *, device: str):
    """The elastic agent's LaunchConfig from the `launcher` group (every key of it)."""
    from torch.distributed.launcher.api import LaunchConfig

    single_node = lc.nnodes == 1 and lc.rdzv_endpoint is None
    return LaunchConfig(
        min_nodes=lc.nnodes, max_nodes=lc.nnodes, nproc_per_node=lc.nproc_per_node,
        # one node: a private id and a free port, so concurrent jobs (a sweep, tests) never meet
        run_id=uuid.uuid4().hex if single_node else lc.rdzv_id,
        rdzv_backend=lc.rdzv_backend, rdzv_endpoint="localhost:0" if single_node else lc.rdzv_endpoint,
        max_restarts=lc.max_restarts, monitor_interval=lc.monitor_interval,
        start_method=_start_method(lc.start_method, device=device, nproc_per_node=lc.nproc_per_node))


def _start_method(choice: str, *, device: str, nproc_per_node: int) -> str:
    """forkserver on CPU: a clean server process imports torch, transformers and effitrain once (per CLI
    process, so once per sweep) and forks each worker from there, saving every worker its ~8 s of imports;
    plain fork would also copy the launcher's threads and locks, which can deadlock a worker. spawn once
    CUDA is in play. Also checks the GPU count."""
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        visible = torch.cuda.device_count()
        if nproc_per_node > visible:
            raise UsageError(f"launcher.nproc_per_node={nproc_per_node} but {visible} GPU(s) are visible; "
                             f"use launcher.nproc_per_node<={visible} (or device=cpu)")
    if choice == "auto":
        return "spawn" if cuda else "forkserver"
    return choice


def _preload_forkserver() -> None:
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["effitrain.train", "effitrain.launch", "transformers.models.llama.modeling_llama",
         "transformers.models.gpt2.modeling_gpt2"])


def _worker(container: dict, run_dir: str):
    """One elastic worker (RANK, WORLD_SIZE, MASTER_ADDR set by the agent): train, return the summary or
    the usage error's text."""
    from effitrain.compose import typed
    from effitrain.train import run

    cfg = typed(container)
    try:
        return run(cfg, Path(run_dir))
    except UsageError as e:
        return str(e)


def _failure_message(e) -> str:
    """The first failing rank's error (its exception and traceback, or the signal that killed it)."""
    # a rank killed by a signal (not the agent's own SIGTERM) is the cause; its peers then fail on a dead connection
    def cause_first(item):
        failure = item[1]
        return (not (failure.exitcode < 0 and failure.signal_name() != "SIGTERM"), failure.timestamp)

    rank, failure = min(e.failures.items(), key=cause_first)
    if isinstance(failure.message, dict):  # written by the worker's error handler: exception + traceback
        text = failure.message.get("message", "")
        trace = failure.message.get("extraInfo", {}).get("py_callstack", "")
        detail = f"{text}\n{trace}".strip()
    else:
        detail = failure.message or f"exit code {failure.exitcode}"
    if failure.exitcode < 0:
        detail = f"killed by {failure.signal_name()}; {detail}"
    return f"worker rank {rank} (pid {failure.pid}) failed, job stopped: {detail}"
