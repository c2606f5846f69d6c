"""Composed config -> the current process (world size 1, or already a torchrun worker) or torchrun workers.

Workers are started by torch's elastic agent (`elastic_launch`, the engine behind torchrun) with the
composed config handed to a Python function: nothing is re-parsed from argv, so every rank trains
exactly the config the CLI checked.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from effitrain.checks import world_size
from effitrain.distributed import in_torchrun_worker
from effitrain.errors import UsageError

log = logging.getLogger("effitrain")


class WorkerFailed(RuntimeError):
    """A worker process died or raised: the job was stopped; the message names the failing rank."""


def launch(cfg: DictConfig, run_dir: Path) -> dict:
    """Train `cfg` into run_dir with the launch shape its `launcher` group asks for; returns the summary."""
    from effitrain.train import run

    if world_size(cfg.launcher) == 1 or in_torchrun_worker():
        return run(cfg, run_dir)
    return _launch_workers(cfg, run_dir)


def _launch_workers(cfg: DictConfig, run_dir: Path) -> dict:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from effitrain.runs import read_summary

    lc = cfg.launcher
    start_method = _start_method(lc.start_method, device=cfg.device, nproc_per_node=lc.nproc_per_node)
    single_node = lc.nnodes == 1 and lc.rdzv_endpoint is None
    config = LaunchConfig(
        min_nodes=lc.nnodes, max_nodes=lc.nnodes, nproc_per_node=lc.nproc_per_node,
        # one node: a private id and a free port, so concurrent jobs (a sweep, tests) never meet
        run_id=uuid.uuid4().hex if single_node else lc.rdzv_id,
        rdzv_backend=lc.rdzv_backend, rdzv_endpoint="localhost:0" if single_node else lc.rdzv_endpoint,
        max_restarts=lc.max_restarts, monitor_interval=lc.monitor_interval, start_method=start_method)
    # the agent logs each failure as a wall of text; _failure_message says it once, with the rank
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if start_method == "forkserver":
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
    from effitrain.config import TrainConfig
    from effitrain.train import run

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), container)
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


def compose_for_worker(args: list[str]) -> tuple[DictConfig, Path]:
    """`torchrun ... -m effitrain.train [overrides]`: every rank composes the same config; rank 0 makes the
    run directory (saving the config as Hydra would) and broadcasts its path, so all ranks agree on it."""
    import torch.distributed as dist

    from effitrain.checks import check_all
    from effitrain.cli import compose_all, normalize
    from effitrain.distributed import init_world

    overrides = normalize(args)
    cfg = next(compose_all(overrides))
    # the launch shape is torchrun's, not the launcher group's: record it, so checks and reproduce see the truth
    cfg.launcher.nproc_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cfg.launcher.nnodes = int(os.environ.get("WORLD_SIZE", 1)) // cfg.launcher.nproc_per_node
    check_all(cfg)
    world = init_world(cfg.device)
    box = [None]
    if world.is_main:
        box[0] = str(_new_run_dir(cfg, overrides))
    if world.distributed:
        dist.broadcast_object_list(box, src=0)
    return cfg, Path(box[0])


def _new_run_dir(cfg: DictConfig, overrides: list[str]) -> Path:
    run_dir = Path("outputs") / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}_{cfg.name}"
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    return run_dir


def worker_main(args: list[str] | None = None) -> None:
    """Entry of `python -m effitrain.train` (torchrun/srun from outside): compose, train; bad input exits 2."""
    from effitrain.runs import mark_launch
    from effitrain.train import run

    mark_launch()
    try:
        cfg, run_dir = compose_for_worker(sys.argv[1:] if args is None else args)
        run(cfg, run_dir)
    except UsageError as e:
        print(f"effitrain: error: {e}", file=sys.stderr)
        sys.exit(2)
