"""What a run may touch in its directory, in one place: which directory it may claim, the lock that makes it the only
writer, how its files are written (never through a symlink; whole, fsynced, renamed), and what a failure may delete
(only what this invocation created, never a complete checkpoint).

    RUN_DIR/.effitrain/run.json   the run's identity (run_id), written once when effitrain first claims the directory
    RUN_DIR/.effitrain/lock       flock()ed by the process that launched the run, for the run's life (pid, host in it)

A directory is claimed for a new run only when it is new or empty; one that holds an effitrain run is continued only
by `resume` (or a restarted worker, or a resumed sweep), one that holds anything else is never written.
No torch here: the CLI claims before anything starts.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from effitrain.errors import IOFailure, UsageError, io_failure
from effitrain.files import write_file

log = logging.getLogger("effitrain")

META = ".effitrain"
RUN_FILE = "run.json"
LOCK_FILE = "lock"


class RunClaim:
    """This invocation's hold on a run directory: the lock, and the entries that were there before it (what a
    failure must leave).

    Args:
        run_dir: the run (or sweep) directory.
        mode: "new" -- a new or empty directory only (train, reproduce, a sweep's job); "continue" -- also one that
            holds an effitrain run (a restarted torchrun worker, a search's stable sweep directory); "adopt" -- the
            run directory the user named to continue (resume, a resumed sweep), already read as a run's: an earlier
            run's files are its own, and it gets an identity if it had none.
        lock: take the one-writer lock (the launching process; workers run under their launcher's lock).
        made: the caller has just made run_dir itself (an exclusive mkdir): it is this invocation's.
        job: a sweep's job directory, where Hydra has written .hydra/ before effitrain's task runs.
        checkpoints: where the run's checkpoints go (checkpoint.dir), when not RUN_DIR/checkpoints.
    """

    def __init__(self, run_dir: Path, *, mode: str = "new", lock: bool = True, made: bool = False,
                 job: bool = False, checkpoints: Path | None = None):
        self.run_dir, self.checkpoints = Path(run_dir), checkpoints
        self.created_dir, self.settled = made, False
        self.before: set[str] = set()
        self._lock_fd: int | None = None
        try:
            self._claim(mode, job=job)
            if lock:
                self._lock()
        except (OSError, IOFailure):  # the disk refused the identity or the lock file: what this claim made goes
            self.undo()
            raise

    # --- claiming -------------------------------------------------------------------------------------------------
    def _claim(self, mode: str, *, job: bool) -> None:
        d = self.run_dir
        if d.is_symlink():
            raise UsageError(f"run directory {d} is a symlink; give the directory itself")
        if d.exists() and not d.is_dir():
            raise UsageError(f"run directory {d} is an existing file, not a directory; choose another hydra.run.dir")
        if not d.exists():
            try:
                d.mkdir(parents=True)
            except FileExistsError:  # made meanwhile (two runs in one second): judged below like any existing one
                pass
            except OSError as e:
                raise UsageError(f"run directory {d} cannot be made: {e.strerror or e}") from None
            else:
                self.created_dir = True
        self.before = _entries(d)
        ours = run_id(d) is not None
        written = self.before - {META, f"{META}/{RUN_FILE}", f"{META}/{LOCK_FILE}", *(_HYDRA_FILES if job else ())}
        if mode != "adopt" and written and not ours:
            raise UsageError(f"{d} already holds files effitrain did not write (e.g. {sorted(written)[0]!r}); a run "
                             "writes only into a new or empty directory: choose another directory")
        if mode == "new" and ours and written:
            raise UsageError(f"{d} holds the effitrain run {run_id(d)}: continue it with effitrain resume {d}, or "
                             "choose another directory for a new run")
        if not ours:
            ensure_run_id(d)

    # --- one writer -----------------------------------------------------------------------------------------------
    def _lock(self) -> None:
        path = self.run_dir / META / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UsageError(f"{path} cannot be opened as the run's lock ({e.strerror}); is it a symlink?") from None
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
            raise UsageError(f"{self.run_dir} is in use by {who} (another train or resume writes it); wait for it to "
                             "end, or choose another directory") from None
        if holder and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
            log.warning(f"{self.run_dir}: taking over the lock of pid {holder.get('pid')}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:  # an emptied lock file is a released one; a holder left in it died holding it
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:  # a full disk cannot refuse a truncation; a gone directory can
                pass
            os.close(self._lock_fd)  # closing drops the flock; the file stays (it belongs to the run)
            self._lock_fd = None

    # --- failure --------------------------------------------------------------------------------------------------
    def undo(self) -> list[str]:
        """After a failure: remove the entries this invocation created (and the directory, if it made it and it is
        empty then), unless the run now holds a result -- a complete checkpoint (in `checkpoints` too) or a finished
        run's summary.json (a sweep's job): then everything stays, resumable. Once only: a claim kept or undone is
        settled. The removed entries (relative paths)."""
        from effitrain.checkpoint.layout import complete_checkpoints

        self.release()
        d = self.run_dir
        if self.settled or not d.is_dir() or _holds_results(d) or (
                self.checkpoints is not None and complete_checkpoints(self.checkpoints)):
            self.settled = True
            return []
        self.settled = True
        new = sorted(_entries(d) - self.before, key=lambda p: p.count("/"), reverse=True)
        for rel in new:  # deepest first: a directory is empty once its new files are gone
            path = d / rel
            try:
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError:  # a directory that still holds something this invocation did not make stays
                pass
        if self.created_dir:
            try:
                d.rmdir()
            except OSError:
                pass
        return new


def _holds_results(d: Path) -> bool:
    """A complete checkpoint (step-N/ with its manifest) or a summary.json anywhere below d."""
    from effitrain.checkpoint.layout import MANIFEST, STEP_NAME

    for root, _, files in os.walk(d):
        name = os.path.basename(root)
        if "summary.json" in files or (MANIFEST in files and STEP_NAME.fullmatch(name)):
            return True
    return False


_HYDRA_FILES = {".hydra", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"}


def _entries(d: Path) -> set[str]:
    """Every path under d, relative (symlinks listed, not followed)."""
    if not d.is_dir():
        return set()
    found = set()
    for root, dirs, files in os.walk(d):
        rel = os.path.relpath(root, d)
        for name in dirs + files:
            found.add(name if rel == "." else f"{rel}/{name}")
    return found


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (ValueError, OSError):
        return {}


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


# --- the claims of this process: made by the CLI before Hydra runs, used by the task Hydra calls -----------------

_CLAIMS: dict[str, RunClaim] = {}


def claim_for_hydra(cfg, args: list[str], *, multirun: bool, resuming: bool) -> list[str]:
    """Claim the run (or sweep) directory of a checked `effitrain train` before Hydra writes into it; the arguments
    with the directory pinned, so Hydra uses exactly the one claimed (its default names the second: two runs
    started in one second would share it). `resuming`: a resumed sweep (sweep.resume=), whose directory it is."""
    from omegaconf import OmegaConf

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = Path(OmegaConf.select(cfg, key))
    stable = multirun and OmegaConf.select(cfg, "hydra.sweeper.sweep_dir", default=None) is not None
    mode = "adopt" if multirun and resuming else "continue" if stable else "new"
    with _signals_held(signal.SIGINT, signal.SIGTERM):  # a directory made is registered before Ctrl-C can act
        made = False
        if not any(a.startswith(f"{key}=") for a in args) and not stable:
            path, made = make_unused(path), True
            args = [*args, f"{key}={_quoted(str(path))}"]
        _register(path, mode=mode, made=made)
    return args


def claim_of(run_dir: Path, *, continuing: bool, checkpoints: Path | None = None) -> RunClaim:
    """The claim this process holds on run_dir (a single run: the CLI's), or a new one (a sweep's job directory);
    `checkpoints`: the run's checkpoint directory, which a failure's undo must look at too."""
    claim = _CLAIMS.get(os.path.realpath(run_dir)) or _register(run_dir, mode="adopt" if continuing else "new",
                                                                  job=True)
    claim.checkpoints = checkpoints
    return claim


def _register(path: Path, **kwargs) -> RunClaim:
    """Claim and remember, with Ctrl-C held back meanwhile: a directory made must be known before an interrupt can
    ask for it to be undone."""
    with _signals_held(signal.SIGINT, signal.SIGTERM):
        claim = _CLAIMS[os.path.realpath(path)] = RunClaim(path, **kwargs)
    return claim


@contextmanager
def _signals_held(*signals: int):
    """Hold the signals back until the block ends, then deliver them to the handlers that were there. Blocking them
    (pthread_sigmask) would not do: it blocks them for the calling thread only, and the kernel hands a signal sent
    to the process to any thread that does not block it -- Python then still runs the handler in the main thread,
    mid-block (a Ctrl-C between writing run.json and registering the claim left the new directory behind)."""
    if threading.current_thread() is not threading.main_thread():  # handlers can be set from the main thread only
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: arrived.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in arrived:
            signal.raise_signal(sig)


def release_claims(*, undo: bool = False) -> None:
    """Let go of this process's claims; after a failure (`undo`), remove what they made first (a claim already
    kept or undone by the task stays as it was settled)."""
    for claim in _CLAIMS.values():
        claim.undo() if undo else claim.release()
    _CLAIMS.clear()


def make_unused(path: Path) -> Path:
    """`path`, or `path-1`, `path-2`...: the first that an exclusive mkdir makes (two commands started in the same
    second each get their own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, k = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate, k = path.with_name(f"{path.name}-{k}"), k + 1


def _quoted(value: str) -> str:
    """A value as one quoted Hydra override string (a comma or a space in it would otherwise split it)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_id(run_dir: Path) -> str | None:
    """The id effitrain gave the run in run_dir when it first claimed it; None where there is none (not a run
    effitrain wrote)."""
    path = Path(run_dir) / META / RUN_FILE
    try:
        data = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return None
    value = data.get("run_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def ensure_run_id(run_dir: Path) -> str:
    """The run's id, written first where none was (a claim, a test or benchmark calling train.run, a worker torchrun
    started from outside): every checkpoint names the run it belongs to. A disk that refuses it: IOFailure."""
    found = run_id(run_dir)
    if found is None:
        meta = Path(run_dir) / META
        try:
            meta.mkdir(exist_ok=True)
            write_file(meta / RUN_FILE, json.dumps({"run_id": uuid.uuid4().hex, "created": time.time(),
                                                    "host": socket.gethostname()}))
        except OSError as e:
            raise io_failure(e, meta, doing="cannot write the run's identity") from None
        found = run_id(run_dir)
    if found is None:  # a run.json that is a symlink or unreadable and stays so
        raise IOFailure(f"{run_dir / META / RUN_FILE} cannot be read back as the run's identity")
    return found
