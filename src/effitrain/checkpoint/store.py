"""Checkpoints on disk: a TrainState through torch.distributed.checkpoint (DCP), atomic, optionally async.

Layout: `<dir>/step-N/` holds DCP's `.metadata`, one shard file per rank, the `.run_id` marker and `manifest.json`.
A save writes `step-N.tmp/` and renames it once every rank's shards and the manifest are there, so a kill mid-save
leaves a `.tmp` directory that `complete_checkpoints` ignores (and this run's next save removes) and the previous one
intact. Every file is fsynced, then the manifest (with every file's size and xxh3-128), then the directory; the
rename is fsynced too, as journaling stores do. A save never touches another run's checkpoint: a step-N or
step-N.tmp of another run in the way stops the run with one line; rotation deletes only this run's, and only once
`keep_last` newer ones verify.

Loading verifies every file a rank reads against the manifest first (`SafeReader`); a resumed run whose newest
checkpoint does not verify falls back to its newest one that does, says so in a warning, and sets the failed one
aside as step-N.unverified (`resume_latest`).

Loading never unpickles objects: DCP's `.metadata` (a pickle) goes through an allow-list unpickler that admits
only DCP's own metadata classes, and DCP's byte entries (optimizer hyperparameters, scheduler state, counters)
through `torch.load(weights_only=True)`. A checkpoint someone sent cannot run code here.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from effitrain.checkpoint import GROUP
from effitrain.checkpoint.layout import (
    HASH,
    MANIFEST,
    MARKER,
    CheckpointError,
    CorruptCheckpoint,
    checksum_files,
    complete_checkpoints,
    marker_owner,
    own_checkpoints,
    owner,
    read_manifest,
    read_regular,
    sealed,
    set_aside,
    step_dir,
    tmp_dir,
    verify,
    verify_file,
)
from effitrain.errors import IOFailure, io_failure
from effitrain.files import fsync_dir, write_file

log = logging.getLogger("effitrain")


class Checkpointer:
    """Saves the TrainState on the `checkpoint` group's cadence; at most one async save in flight.

    Args:
        cfg: the `checkpoint` config group (kind sync or async).
        root: the directory the step-N/ checkpoints go in.
        world: the process's World.
        manifest: run facts every manifest repeats (run id, config hash, world shape, version).
    """

    def __init__(self, cfg, *, root: Path, world, manifest: dict):
        self.cfg, self.root, self.world, self.manifest = cfg, root, world, manifest
        self.run_id = manifest["run_id"]
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
        if self._saved_before(step):
            return
        tmp = self._start_tmp(step)
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

    def _saved_before(self, step: int) -> bool:
        """Whether step-N is already there as this run's own (a resumed run re-reaching a step it saved: the same
        state). Another run's step-N in the way (a shared checkpoint.dir, a run directory reused) is never kept in
        silence: the run stops. Every rank decides alike, from the same files."""
        existing = step_dir(self.root, step)
        if not existing.exists():
            return False
        theirs = owner(existing)
        if theirs is not None and theirs == self.run_id:
            return True
        raise CheckpointError(f"{existing} is in the way and is not this run's (it is "
                              f"{f'run {theirs}' if theirs else 'of no known run'}): the run stops; give this run its "
                              "own checkpoint.dir (or move that checkpoint away)")

    def _start_tmp(self, step: int) -> Path:
        """step-N.tmp, new, with this run's marker in it first. One already there is removed only if this run left
        it (a kill mid-save) or it holds no checkpoint data; another run's is refused (every rank checks alike)."""
        tmp = tmp_dir(self.root, step)
        if tmp.exists() and marker_owner(tmp) != self.run_id and _holds_data(tmp):
            raise CheckpointError(f"{tmp} was left by another run ({marker_owner(tmp) or 'no run id'}) and is in "
                                  "the way: the run stops; give this run its own checkpoint.dir (or move it away)")
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
                _write_marker(tmp, self.run_id)
            except OSError as e:
                self._failed(step, e)
        _barrier()
        return tmp

    def _complete(self, step: int, *, model_only: bool, seconds: float, stall: float) -> None:
        """Rank 0: checksum and fsync every file, the manifest, rename step-N.tmp -> step-N durably, then drop what
        keep_last allows. Every rank's shards are written once DCP's save returns on the coordinator (it writes
        .metadata last, after gathering every rank's results).

        Rank 0 hashes all ranks' files: every rank writes into one directory that all of them see (a node's disk, a
        cluster's shared file system: DCP's resharding load needs that anyway), the files were just written so
        they are read from the page cache at memory speed, and there is no extra collective (an async save
        completes from whichever step polls it first, where a gather would have to be scheduled on every rank).

        seconds: from the save's start until DCP was done (async: at the first step after the write ended); stall:
        how long training waited for it (async: planning and the copy to host memory), checksums included."""
        if not self.world.is_main:
            return
        tmp, final = tmp_dir(self.root, step), step_dir(self.root, step)
        try:
            t0 = time.perf_counter()
            files = checksum_files(tmp, sync=True)
            hash_s = time.perf_counter() - t0
            # every float at most 15 significant digits: a changed digit is a changed value, caught by the checksum
            manifest = self.manifest | {
                "step": step, "model_only": model_only, "saved_at": round(time.time(), 3), "save_s": round(seconds, 4),
                "stall_s": round(stall + hash_s, 4), "hash_s": round(hash_s, 4), "hash": HASH,
                "bytes": sum(f["bytes"] for f in files.values()), "files": files}
            write_file(tmp / MANIFEST, sealed(manifest))  # fsynced, renamed into place, tmp/ fsynced
            fsync_dir(self.root)  # step-N.tmp's own entry is durable before it is renamed...
            tmp.rename(final)
            fsync_dir(self.root)  # ...and the rename after
        except OSError as e:
            self._failed(step, e)
        log.info(f"checkpoint step-{step}: {manifest['bytes'] / 2**20:.1f} MiB in {seconds:.2f} s, checksums "
                 f"{hash_s:.2f} s (training waited {stall + hash_s:.2f} s) -> {final}")
        if self.cfg.keep_last > 0:
            rotate(self.root, run_id=self.run_id, keep_last=self.cfg.keep_last)

    def _failed(self, step: int, error: Exception) -> None:
        """The save failed: remove this save's step-N.tmp, then one line -- an I/O failure (disk full: exit 74) or
        a checkpoint error (exit 2) -- saying whether an earlier checkpoint stays."""
        if self.world.is_main:
            shutil.rmtree(tmp_dir(self.root, step), ignore_errors=True)
        done = complete_checkpoints(self.root)
        kept = f"the previous checkpoint {done[-1][1].name} is intact" if done else "no earlier checkpoint exists"
        what = f"checkpoint step-{step} could not be written to {self.root}"
        cause = _os_error(error)
        if cause is not None:
            where = cause.filename or self.root
            raise IOFailure(f"{io_failure(cause, where, doing=what)}; the run stops ({kept})") from None
        raise CheckpointError(f"{what}: {_reason(error)}; the run stops ({kept})") from None


def rotate(root: Path, *, run_id: str, keep_last: int) -> list[Path]:
    """Keep run `run_id`'s newest `keep_last` checkpoints under root that verify; delete its older ones (the deleted).

    Verifying here reads each manifest back and checks every file's size: the checksums were taken from the files
    on disk after they were fsynced, and hashing them again would double the cost for the same page-cache bytes.
    Another run's checkpoints, and any whose manifest does not verify, are not this run's to delete; one of this
    run's that does not verify does not count towards keep_last, so the older good one stays."""
    good, deleted = 0, []
    for _, path in reversed(complete_checkpoints(root)):
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            continue
        if manifest.get("run_id") != run_id:
            continue
        if good >= keep_last:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
            continue
        try:
            verify(path, manifest, deep=False)
            good += 1
        except CorruptCheckpoint as e:
            log.warning(f"{e}: it does not count towards checkpoint.keep_last={keep_last}")
    return deleted


@GROUP.builder("sync")
@GROUP.builder("async")
def build_checkpointer(cfg, *, root: Path, world, manifest: dict) -> Checkpointer:
    return Checkpointer(cfg, root=root, world=world, manifest=manifest)


@GROUP.builder("off")
def no_checkpointer(cfg, **_) -> None:
    return None


def resume_latest(state, root: Path, *, run_id: str, world) -> tuple[Path, dict] | None:
    """Load this run's newest checkpoint under root that verifies into `state`: (its path, its manifest), or None
    where the run has none.

    One that does not verify (a file changed, truncated or missing; a damaged manifest) is passed over with a
    warning naming the file, and once an earlier one has loaded it is set aside as step-N.unverified (kept, never
    loaded or rotated again; the run saves step-N anew when it gets there). A checkpoint of another run (or one
    from before run ids) met first is refused in one line: `checkpoint.resume_from` is how a run starts from
    another's weights. Every rank walks the same list and fails alike: DCP reports any rank's failure to all.
    """
    passed: list[tuple[Path, CheckpointError]] = []
    for path, _, error in own_checkpoints(root, run_id):
        if error is None:
            try:
                return _resumed(path, load_checkpoint(state, path, world=world, what="resume"), passed, world)
            except CorruptCheckpoint as e:
                error = e
        if world.is_main:
            log.warning(f"{error}; trying this run's checkpoint before {path.name}")
        passed.append((path, error))
    if passed:
        raise CheckpointError(f"{passed[0][1]}; and no earlier checkpoint of this run in {root} verifies")
    return None


def _resumed(path: Path, manifest: dict, passed: list, world) -> tuple[Path, dict]:
    if passed and world.is_main:
        aside = [set_aside(p).name for p, _ in passed]
        log.warning(f"resuming from {path.name}, the newest checkpoint of this run that verifies; "
                    f"{', '.join(aside)} set aside (not loaded, not deleted)")
    return path, manifest


def load_checkpoint(state, path: Path, *, world, what: str = "resume") -> dict:
    """Load the checkpoint at `path` (a step-N directory) into `state`, each rank verifying the files it reads
    first; its manifest, with `verify_s`: this rank's seconds spent on checksums.

    Args:
        what: "resume" (everything: the run continues), "weights" (the model only: a new run starts from it) or
            "weights+optimizer" (also the optimizer state; step, schedule and RNG start fresh).

    The checkpoint may have been written at another world size: DCP reshards model and optimizer; the per-rank
    part (RNG states, a ZeRO-1 optimizer shard) does not carry over -- RNG stays as the job seeded it, ZeRO-1 is
    refused with one line. A file that differs from the manifest raises CorruptCheckpoint naming it.
    """
    manifest = read_manifest(path)
    if manifest.get("model_only") and what != "weights":
        raise CheckpointError(f"{path} holds model weights only (checkpoint.model_only): it can start a new run "
                              "(checkpoint.resume_from) or be exported, not resumed")
    saved_keys = SafeReader(path, files=manifest["files"]).read_metadata().state_dict_metadata.keys()
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
    verify_s = _load(wanted, path, files=manifest["files"])
    try:
        state.load_checkpoint_state_dict(wanted, rank=world.rank)
    except Exception as e:  # noqa: BLE001 -- entries that verified and unpickled as plain data but not as ours
        raise CheckpointError(f"{path} does not fit this run: {type(e).__name__}: {_first_line(e)}") from None
    return manifest | {"verify_s": verify_s}


def _load(state: dict, path: Path, *, files: dict) -> float:
    """dcp.load through the safe reader and planner; any failure (a missing key, a refused entry, a short file) is
    one CheckpointError line (a CorruptCheckpoint where a file differs from the manifest). The seconds this rank
    spent verifying."""
    reader = SafeReader(path, files=files)
    reader.read_metadata()  # refused here, in one line, rather than inside DCP (which logs and retries)
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as e:
        refused = next((f for f in _rank_failures(e) if isinstance(f, CheckpointError)), None)
        if isinstance(refused, CorruptCheckpoint):  # its own line names the file
            raise CorruptCheckpoint(str(refused)) from None
        if refused is not None:
            raise CheckpointError(f"{path}: {refused}; nothing was loaded") from None
        failure = next(iter(_rank_failures(e)), None)
        why = _reason(e) if failure is None or _os_error(e) else f"{type(failure).__name__}: {_first_line(failure)}"
        raise CheckpointError(f"{path} could not be loaded: {why}") from None
    except (RuntimeError, OSError, ValueError) as e:  # planning: a key the checkpoint lacks, a shape that differs
        raise CheckpointError(f"{path} does not fit this run: {_first_line(e)}") from None
    return reader.verify_s


# --- loading without unpickling objects -------------------------------------------------------------------------

class _MetadataUnpickler(pickle._Unpickler):
    """DCP's .metadata is a pickle of its own dataclasses: admit those, torch dtypes/sizes/layouts, paths.

    The pure-Python unpickler, not the C one: the C one sizes its memo table from the index a pickle names, so a
    crafted 4-byte index asks for gigabytes (MemoryError here, the OOM killer where overcommit lets it through);
    the Python one keeps a dict and allocates no more than the file holds -- but for BYTEARRAY8, which allocates
    the length it names before reading, and which DCP's metadata never holds. A .metadata is small (KBs to MBs)."""

    def _no_bytearray(self):
        raise pickle.UnpicklingError("a DCP checkpoint's metadata never holds a bytearray")

    dispatch = dict(pickle._Unpickler.dispatch) | {pickle.BYTEARRAY8[0]: _no_bytearray}

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
    """FileSystemReader that verifies every file it reads against the manifest's sizes and checksums (`files`)
    before reading it, and reads the metadata with the allow-list unpickler (DCP's own uses pickle.load).

    The files a rank reads are those its load plan names (its own shards; under resharding or a replicated model,
    parts of others'), each hashed once; `.metadata` every time it is read (small)."""

    def __init__(self, path, *, files: dict):
        super().__init__(path)
        self.files, self.verified, self.verify_s = files, set(), 0.0

    def read_metadata(self, *args, **kwargs) -> Metadata:
        data = self._verified_bytes(".metadata")
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except Exception as e:  # noqa: BLE001 -- a damaged pickle raises nearly anything (struct, Index, Type...)
            raise CheckpointError(f"{self.path}: not a loadable checkpoint (.metadata: {type(e).__name__}: "
                                  f"{_first_line(e)}); nothing was loaded") from None
        _check_metadata(metadata, self.path)
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        for name in {self.storage_data[item.storage_index].relative_path for item in plan.items}:
            if name not in self.verified:
                self._verify(name)
        return super().read_data(plan, planner)

    def _verify(self, name) -> None:
        t0 = time.perf_counter()
        verify_file(Path(self.path), name, self.files)
        self.verified.add(name)
        self.verify_s += time.perf_counter() - t0

    def _verified_bytes(self, name: str) -> bytes:
        """The whole file, once its size and checksum match the manifest's (read once, for both)."""
        t0 = time.perf_counter()
        verify_file(Path(self.path), name, self.files, deep=False)  # the size first: never read a huge impostor
        try:
            data = read_regular(Path(self.path) / name)
        except OSError as e:
            raise CorruptCheckpoint(f"{Path(self.path) / name} cannot be read ({e.strerror or e})") from None
        if xxhash.xxh3_128_hexdigest(data) != self.files[name][HASH]:
            raise CorruptCheckpoint(f"{Path(self.path) / name}: its {HASH} checksum differs from the manifest's "
                                    "(the file changed after it was saved)")
        self.verify_s += time.perf_counter() - t0
        return data


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
        probe = root / f".write-test.{os.getpid()}"  # a new file of this process's (O_EXCL: never through a link)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint.dir {root} is not writable: {_reason(e)}") from None


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _reason(error: BaseException) -> str:
    """The root OSError of a (possibly DCP-wrapped, per-rank) failure, as one line."""
    root = _os_error(error) or error
    text = f"[Errno {root.errno}] {root.strerror}" if isinstance(root, OSError) and root.strerror else str(root)
    return text.splitlines()[0] if text else type(root).__name__


def _os_error(error: BaseException) -> OSError | None:
    """The OSError at the root of a (possibly DCP-wrapped, per-rank) failure, if one is."""
    seen = [error]
    while seen[-1].__cause__ is not None or seen[-1].__context__ is not None:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    seen += _rank_failures(error)
    return next((e for e in seen if isinstance(e, OSError)), None)


def _rank_failures(error: BaseException) -> list[BaseException]:
    """The per-rank exceptions a CheckpointException carries ({rank: (exception, traceback)})."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict):
        return []
    return [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _holds_data(tmp: Path) -> bool:
    """Whether a step-N.tmp holds anything but (possibly) a marker: a kill can land between its mkdir and the
    marker's write, and an empty one loses nothing when removed."""
    try:
        return any(entry.name != MARKER for entry in os.scandir(tmp))
    except OSError:
        return True


def _write_marker(tmp: Path, run_id: str) -> None:
    """step-N.tmp/.run_id, fsynced: which run may remove this directory if the save never completes."""
    fd = os.open(tmp / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(run_id)
        f.flush()
        os.fsync(f.fileno())


def _check_metadata(metadata, path) -> None:
    """The parts of DCP's metadata read outside DCP's own error handling have the types DCP gives them."""
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict) \
            or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"{path}/.metadata is not DCP metadata; nothing was loaded")
    if not isinstance(getattr(metadata, "storage_meta", None), StorageMeta):
        metadata.storage_meta = StorageMeta()


def load_model_weights(model, path: Path) -> None:
    """A checkpoint's model weights into a plain (unwrapped, one-process) model: DCP gathers every shard, each file
    verified first."""
    state = {"model": model.state_dict()}
    _load(state, path, files=read_manifest(path)["files"])
    model.load_state_dict(state["model"])  # in place already; this checks that every parameter was there
