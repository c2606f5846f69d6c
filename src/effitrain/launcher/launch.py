"""Launching, the `launcher` group's builder: torchrun workers under torch's elastic agent, each running the entry
it is given (the engine decides what runs in this process: engine.train.launch).

Workers are started by torch's elastic agent (`elastic_launch`, the engine behind torchrun) with the
composed config handed to a Python function: nothing is re-parsed from argv, so every rank trains
exactly the config the CLI checked.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from pathlib import Path
from typing import Callable

from effitrain.errors import Interrupted, Preempted, RunStopped, UsageError, raise_reported, stop_report
from effitrain.launcher import GROUP

log = logging.getLogger("effitrain")


class WorkerFailed(RuntimeError):
    """A worker process died or raised: the job was stopped; the message names the failing rank."""


@GROUP.builder("launcher")
def launch_workers(cfg, run_dir: Path, *, entry: Callable, resume: bool = False) -> dict:
    """Start the workers under torch's elastic agent and wait for them; rank 0's summary. A stop a worker reports
    (bad input found late, preemption, divergence) is raised here as the same exception.

    Args:
        entry: what each worker runs, `(config container, run_dir, *, resume) -> summary` (the engine's
            run_container: the launcher starts processes, it does not know what they train).
    """
    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing.api import SignalException
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
    signals = _forwarding_preemption_signals()
    try:
        with signals, _fresh_store_per_restart(cfg.launcher.max_restarts):
            results = elastic_launch(config, _worker)(entry, container, str(run_dir), resume)
    except SignalException:  # SIGTERM here: the agent passed it on to the workers, which saved if they could
        raise _preempted_or(run_dir) from None
    except ChildFailedError as e:
        if signals.interrupts > 1:  # a worker stuck in a collective was killed after the second Ctrl-C
            raise Interrupted(f"interrupted twice: the workers were stopped without saving; effitrain resume "
                              f"{run_dir} continues from the latest complete checkpoint") from None
        raise WorkerFailed(_failure_message(e)) from None
    for result in sorted(results.values(), key=lambda r: "effitrain_stop" not in r):
        raise_reported(result)
    return read_summary(run_dir)


def launch_config(lc, *, device: str):
    """The elastic agent's LaunchConfig from the `launcher` group (every key of it)."""
    from torch.distributed.launcher.api import LaunchConfig

    single_node = lc.nnodes == 1 and lc.rdzv_endpoint is None
    endpoint, run_id = lc.rdzv_endpoint, lc.rdzv_id
    if single_node:  # a private id and a free port, so concurrent jobs (a sweep, tests) never meet
        endpoint, run_id = "localhost:0", uuid.uuid4().hex
    elif endpoint == "slurm":  # every node's agent reads the same allocation
        from effitrain.launcher import slurm_rendezvous

        endpoint, run_id = slurm_rendezvous()
    return LaunchConfig(
        min_nodes=lc.nnodes, max_nodes=lc.nnodes, nproc_per_node=lc.nproc_per_node, run_id=run_id,
        rdzv_backend=lc.rdzv_backend, rdzv_endpoint=endpoint,
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
        ["effitrain.launcher._forkserver", "effitrain.engine.train", "effitrain.launcher.launch",
         "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2"])


class _fresh_store_per_restart:
    """With restarts, rank 0 of each attempt hosts the process group's store instead of the agent's shared one:
    the shared store keeps the previous attempt's keys under the same names (torch 2.13), so the restarted gloo
    group would connect to the dead workers' addresses."""

    VAR = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"

    def __init__(self, max_restarts: int):
        self.active = max_restarts > 0 and self.VAR not in os.environ

    def __enter__(self):
        if self.active:
            os.environ[self.VAR] = "1"
        return self

    def __exit__(self, *exc):
        if self.active:
            os.environ.pop(self.VAR, None)


def _preempted_or(run_dir: Path) -> RunStopped:
    from effitrain.runs import read_preempted

    marker = read_preempted(run_dir)
    if marker is None:
        return RunStopped("the job was terminated by a signal before any rank could save a checkpoint")
    return Preempted(marker["message"])


class _forwarding_preemption_signals:
    """SIGUSR1 (SLURM's `--signal`) reaching the launching process goes on to the workers, which save and stop; the
    elastic agent forwards SIGTERM itself. Ctrl-C is effitrain's, not the agent's (which would pass SIGINT on, and
    a worker that also got the terminal's own SIGINT would count two and stop without saving): the first goes on
    as SIGUSR1 (finish the step, save, 75), the second as two SIGINTs (stop at once, 130)."""

    AGENT_SIGNALS = "TORCHELASTIC_SIGNALS_TO_HANDLE"
    GRACE_S = 10.0  # after the second Ctrl-C, before the workers still running are killed

    def __enter__(self):
        import signal
        import threading

        self.previous, self.interrupts = {}, 0
        self.agent_signals = os.environ.get(self.AGENT_SIGNALS)
        if threading.current_thread() is threading.main_thread():
            os.environ[self.AGENT_SIGNALS] = "SIGTERM,SIGHUP,SIGQUIT"
            self.previous = {signal.SIGUSR1: signal.signal(signal.SIGUSR1,
                                                           lambda *_: _signal_descendants(signal.SIGUSR1)),
                             signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt)}
        return self

    def _interrupt(self, *_):
        import signal
        import threading

        self.interrupts += 1
        if self.interrupts == 1:
            log.warning("Ctrl-C: the workers stop after this step (saving a checkpoint first); Ctrl-C again to stop "
                        "at once, without saving")
            _signal_descendants(signal.SIGUSR1)
        else:
            _signal_descendants(signal.SIGINT)
            _signal_descendants(signal.SIGINT)
            # a rank blocked in a collective runs no Python signal handler: whatever still runs soon is killed
            if self.interrupts == 2:
                killer = threading.Timer(self.GRACE_S, _signal_descendants, args=(signal.SIGKILL,))
                killer.daemon = True
                killer.start()

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.previous:
            if self.agent_signals is None:
                os.environ.pop(self.AGENT_SIGNALS, None)
            else:
                os.environ[self.AGENT_SIGNALS] = self.agent_signals


def descendants(root: int) -> list[tuple[int, int, bytes]]:
    """(pid, parent pid, command line) of every process below `root`, from Linux's /proc (empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [(pid, root) for pid in children.get(root, [])]
    while todo:
        pid, parent = todo.pop()
        todo += [(child, pid) for child in children.get(pid, [])]
        try:
            found.append((pid, parent, Path(f"/proc/{pid}/cmdline").read_bytes()))
        except OSError:
            continue  # gone meanwhile
    return found


def _signal_descendants(sig) -> None:
    """Send `sig` to the worker processes below this one: every descendant except multiprocessing's own helpers
    (the forkserver the CPU workers fork from, the resource tracker), which the signal would kill."""
    me = os.getpid()
    for pid, parent, cmdline in descendants(me):
        if b"resource_tracker" in cmdline or (b"forkserver" in cmdline and parent == me):
            continue
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _worker(entry: Callable, container: dict, run_dir: str, resume: bool):
    """One elastic worker (RANK, WORLD_SIZE, MASTER_ADDR set by the agent): run `entry`, return the summary or the
    stop_report of a stop (usage error, preemption, divergence) for the launcher to re-raise."""
    previous = signal.signal(signal.SIGUSR1, _stopped_before_the_loop)  # the loop has its own while it runs
    try:
        return entry(container, Path(run_dir), resume=resume)
    except (UsageError, RunStopped) as e:
        return stop_report(e)
    except KeyboardInterrupt:  # Ctrl-C outside the loop (building, loading, closing): nothing of this attempt saved
        return stop_report(Interrupted(f"interrupted (Ctrl-C); effitrain resume {run_dir} continues from the latest "
                                       "complete checkpoint, if the run has one"))
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _stopped_before_the_loop(signum, frame):
    """SIGUSR1 (a forwarded first Ctrl-C, SLURM's warning) outside the training loop: stop, there is no step to
    finish and save (its default action would kill the worker without a word)."""
    raise KeyboardInterrupt


LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Socket closed", "Broken pipe",
             "remote process exited")


def _failure_message(e) -> str:
    """The first failing rank's error (its exception and traceback, or the signal that killed it)."""
    # a rank killed by a signal (not the agent's own SIGTERM) is the cause; its peers then fail on a dead connection
    def cause_first(item):
        failure = item[1]
        return (not (failure.exitcode < 0 and failure.signal_name() != "SIGTERM"), _lost_peer(failure.message),
                failure.timestamp)

    rank, failure = min(e.failures.items(), key=cause_first)
    message = failure.message
    if _lost_peer(message) and (recorded := _recorded_cause(failure.error_file)) is not None:
        return f"worker rank {recorded[0]} failed, job stopped: {_detail(recorded[1])}"
    detail = _detail(message) or f"exit code {failure.exitcode}"
    if failure.exitcode < 0:
        detail = f"killed by {failure.signal_name()}; {detail}"
    return f"worker rank {rank} (pid {failure.pid}) failed, job stopped: {detail}"


def _detail(message) -> str:
    """A worker's error: exception + traceback when its error handler wrote them (a dict), else the text."""
    if isinstance(message, dict):
        return f"{message.get('message', '')}\n{message.get('extraInfo', {}).get('py_callstack', '')}".strip()
    return message or ""


def _lost_peer(message) -> bool:
    """A failure that says only that a peer went away (gloo's and NCCL's words for it)."""
    text = message.get("message", "") if isinstance(message, dict) else str(message or "")
    return any(words in text for words in LOST_PEER)


def _recorded_cause(error_file: str) -> tuple[int, dict] | None:
    """The error a rank failing alone recorded before it aborted its group (base.distributed.record_failure), when
    the failures the agent saw first are only its peers' lost connections: each local rank's error.json lies in
    its own directory beside the others' (on this node)."""
    import json

    for path in sorted(Path(error_file).parent.parent.glob("*/error.json")):
        try:
            message = json.loads(path.read_text())["message"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(message, dict) and not _lost_peer(message) and path.parent.name.isdigit():
            return int(path.parent.name), message
    return None
