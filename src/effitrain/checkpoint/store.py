"""Checkpoints on disk: a TrainState through torch.distributed.checkpoint (DCP), atomic, optionally async.

Layout: `<dir>/step-N/` holds DCP's `.metadata`, one shard file per rank and `manifest.json`. A save writes
`step-N.tmp/` and renames it once every rank's shards and the manifest are there, so a kill mid-save leaves a
`.tmp` directory that `complete_checkpoints` ignores (and the next save removes) and the previous one intact.

Loading never unpickles objects: DCP's `.metadata` (a pickle) goes through an allow-list unpickler that admits
only DCP's own metadata classes, and DCP's byte entries (optimizer hyperparameters, scheduler state, counters)
through `torch.load(weights_only=True)`. A checkpoint someone sent cannot run code here.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from effitrain.checkpoint import GROUP
from effitrain.checkpoint.layout import (
    MANIFEST,
    CheckpointError,
    complete_checkpoints,
    read_manifest,
    step_dir,
    tmp_dir,
)

log = logging.getLogger("effitrain")


class Checkpointer:
    """Saves the TrainState on the `checkpoint` group's cadence; at most one async save in flight.

    Args:
        cfg: the `checkpoint` config group (kind sync or async).
        root: the directory the step-N/ checkpoints go in.
        world: the process's World.
        manifest: run facts every manifest repeats (config hash, world shape, version).
    """

    def __init__(self, cfg, *, root: Path, world, manifest: dict):
        self.cfg, self.root, self.world, self.manifest = cfg, root, world, manifest
        self.pending = None  # (step, future) of the async save being written
        # async saves coordinate from a background thread: on a group of their own, never interleaved with the
        # training collectives on the default one (gloo, which also serves CPU tensors next to nccl)
        self.group = dist.new_group(backend="gloo") if cfg.kind == "async" and dist.is_initialized() else None
        if world.is_main:
            _check_writable(root)

    def due(self, step: int, *, last: int) -> bool:
        every = self.cfg.every
        return (every > 0 and step % every == 0) or (step == last and self.cfg.save_final)

    def save(self, state, *, final: bool = False, blocking: bool = False) -> None:
        """Write `state` as step-{state.step}; async kind: start the write and return (unless `blocking`)."""
        self.wait()  # one save at a time: the previous must be complete (and renamed) first
        step = state.step
        if (self.root / f"step-{step}").exists():  # a resumed run re-reaching a saved step: it is the same state
            return
        tmp = tmp_dir(self.root, step)
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            _mkdir(tmp)
        _barrier()
        model_only = final and self.cfg.model_only
        t0 = time.perf_counter()
        planned = state.checkpoint_state_dict(rank=self.world.rank, model_only=model_only)
        writer = FileSystemWriter(tmp, thread_count=1)
        try:
            with _quiet_single_process():
                if self.cfg.kind == "async" and not blocking:
                    future = dcp.async_save(planned, storage_writer=writer, process_group=self.group)
                    self.pending = (step, model_only, t0, time.perf_counter() - t0, future)
                    return
                dcp.save(planned, storage_writer=writer)
        except (OSError, CheckpointException) as e:  # disk full, permissions (DCP wraps each rank's OSError)
            self._failed(step, e)
        seconds = time.perf_counter() - t0
        self._complete(step, model_only=model_only, seconds=seconds, stall=seconds)

    def poll(self) -> None:
        """Finish an async save whose write is done (rank 0 renames it now, not at the next save)."""
        if self.pending is not None and self.pending[-1].done():
            self.wait()

    def wait(self) -> None:
        """Block until the async save in flight (if any) is written, then complete it."""
        if self.pending is None:
            return
        step, model_only, t0, stall, future = self.pending
        self.pending = None
        try:
            future.result()
        except (OSError, CheckpointException) as e:
            self._failed(step, e)
        self._complete(step, model_only=model_only, seconds=time.perf_counter() - t0, stall=stall)

    def close(self) -> None:
        self.wait()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    def _complete(self, step: int, *, model_only: bool, seconds: float, stall: float) -> None:
        """Rank 0: manifest, rename step-N.tmp -> step-N (every rank's shards are written once DCP's save returns
        on the coordinator: it writes .metadata last), then drop checkpoints beyond keep_last.

        seconds: from the save's start until it was seen complete (async: at the first step after the write ended);
        stall: how long training waited for it (async: planning and the copy to host memory)."""
        if not self.world.is_main:
            return
        tmp = tmp_dir(self.root, step)
        manifest = self.manifest | {"step": step, "model_only": model_only, "saved_at": time.time(),
                                    "save_s": round(seconds, 4), "stall_s": round(stall, 4),
                                    "bytes": _dir_bytes(tmp)}
        try:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            tmp.rename(step_dir(self.root, step))
        except OSError as e:
            self._failed(step, e)
        log.info(f"checkpoint step-{step}: {manifest['bytes'] / 2**20:.1f} MiB in {seconds:.2f} s (training waited "
                 f"{stall:.2f} s) -> {step_dir(self.root, step)}")
        if self.cfg.keep_last > 0:
            for _, old in complete_checkpoints(self.root)[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def _failed(self, step: int, error: Exception) -> None:
        if self.world.is_main:
            shutil.rmtree(tmp_dir(self.root, step), ignore_errors=True)
        done = complete_checkpoints(self.root)
        kept = f"the previous checkpoint {done[-1][1].name} is intact" if done else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint step-{step} could not be written to {self.root}: {_reason(error)}; "
                              f"the run stops ({kept})") from None


@GROUP.builder("sync")
@GROUP.builder("async")
def build_checkpointer(cfg, *, root: Path, world, manifest: dict) -> Checkpointer:
    return Checkpointer(cfg, root=root, world=world, manifest=manifest)


@GROUP.builder("off")
def no_checkpointer(cfg, **_) -> None:
    return None


def load_checkpoint(state, path: Path, *, world, what: str = "resume") -> dict:
    """Load the checkpoint at `path` (a step-N directory) into `state`; its manifest.

    Args:
        what: "resume" (everything: the run continues), "weights" (the model only: a new run starts from it) or
            "weights+optimizer" (also the optimizer state; step, schedule and RNG start fresh).

    The checkpoint may have been written at another world size: DCP reshards model and optimizer; the per-rank
    part (RNG states, a ZeRO-1 optimizer shard) does not carry over -- RNG stays as the job seeded it, ZeRO-1 is
    refused with one line.
    """
    manifest = read_manifest(path)
    if manifest.get("model_only") and what != "weights":
        raise CheckpointError(f"{path} holds model weights only (checkpoint.model_only): it can start a new run "
                              "(checkpoint.resume_from) or be exported, not resumed")
    saved_keys = SafeReader(path).read_metadata().state_dict_metadata.keys()
    wanted = state.checkpoint_state_dict(rank=world.rank, model_only=what == "weights")
    local = f"rank{world.rank}"
    if what != "resume":
        if state.rank_local_required() and what == "weights+optimizer":
            raise CheckpointError("checkpoint.load_optimizer=true cannot take a ZeRO-1 optimizer's per-rank shards "
                                  "into a new run; drop it (a fresh optimizer) or resume the run itself")
        wanted.pop("trainer")
        wanted.pop(local, None)
    elif manifest["world_size"] != world.size or not any(k.startswith(local) for k in saved_keys):
        if state.rank_local_required():
            raise CheckpointError(f"{path} was written by {manifest['world_size']} ranks and this run has "
                                  f"{world.size}: its ZeRO-1 optimizer keeps per-rank shards that do not reshard; "
                                  f"resume with launcher.nproc_per_node={manifest['world_size']}")
        wanted.pop(local, None)
        if world.is_main:
            log.info(f"loading a checkpoint of {manifest['world_size']} ranks on {world.size}: model and optimizer "
                     "reshard; per-rank RNG states stay as seeded")
    _load(wanted, path)
    state.load_checkpoint_state_dict(wanted, rank=world.rank)
    return manifest


def _load(state: dict, path: Path) -> None:
    """dcp.load through the safe reader and planner; any failure (a missing key, a refused entry, a short file) is
    one CheckpointError line."""
    reader = SafeReader(path)
    reader.read_metadata()  # refused here, in one line, rather than inside DCP (which logs and retries)
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as e:
        refused = next((f for f in _rank_failures(e) if isinstance(f, CheckpointError)), None)
        if refused is not None:
            raise CheckpointError(f"{path}: {refused}; nothing was loaded") from None
        raise CheckpointError(f"{path} could not be loaded: {_reason(e)}") from None
    except (RuntimeError, OSError, ValueError) as e:  # planning: a key the checkpoint lacks, a shape that differs
        raise CheckpointError(f"{path} does not fit this run: {_first_line(e)}") from None


# --- loading without unpickling objects -------------------------------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle of its own dataclasses: admit those, torch dtypes/sizes/layouts, paths."""

    MODULES = {"torch.distributed.checkpoint.metadata": None,
               "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
               "torch.serialization": {"_get_layout"}, "pathlib": {"PosixPath", "PurePosixPath", "Path"},
               "collections": {"OrderedDict"}, "builtins": {"set", "frozenset", "slice"}}

    def find_class(self, module: str, name: str):
        allowed = self.MODULES.get(module, set())
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module in self.MODULES and (allowed is None or name in allowed):
            obj = getattr(__import__(module, fromlist=[name]), name)
            if allowed is not None or isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"a DCP checkpoint's metadata never holds {module}.{name}")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read by the allow-list unpickler (DCP's own uses pickle.load)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self.fs.concat_path(self.path, ".metadata")
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise CheckpointError(f"{self.path}: not a loadable checkpoint ({e}); nothing was loaded") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}/.metadata is not DCP metadata; nothing was loaded")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner with `weights_only=True` for byte entries (DCP's own passes weights_only=False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            why = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "refused")
            why = why.split(" Please use")[0].removeprefix("WeightsUnpickler error: ")
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is not plain data ({why})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# --- small helpers ------------------------------------------------------------------------------------------------

@contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group that it assumes one process: that is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _check_writable(root: Path) -> None:
    """At start, not at the first save: an unwritable checkpoint dir is one line before any step is spent."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint.dir {root} is not writable: {_reason(e)}") from None


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path.name} could not be made in {path.parent}: {_reason(e)}; "
                              "the run stops") from None


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _reason(error: BaseException) -> str:
    """The root OSError of a (possibly DCP-wrapped, per-rank) failure, as one line."""
    seen = [error]
    while seen[-1].__cause__ is not None or seen[-1].__context__ is not None:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    seen += _rank_failures(error)
    root = next((e for e in seen if isinstance(e, OSError)), error)
    text = f"[Errno {root.errno}] {root.strerror}" if isinstance(root, OSError) and root.strerror else str(root)
    return text.splitlines()[0] if text else type(root).__name__


def _rank_failures(error: BaseException) -> list[BaseException]:
    """The per-rank exceptions a CheckpointException carries ({rank: (exception, traceback)})."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict):
        return []
    return [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_model_weights(model, path: Path) -> None:
    """A checkpoint's model weights into a plain (unwrapped, one-process) model: DCP gathers every shard."""
    state = {"model": model.state_dict()}
    _load(state, path)
    model.load_state_dict(state["model"])  # in place already; this checks that every parameter was there
