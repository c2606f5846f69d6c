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
import shutil
import socket
import time
import uuid
from pathlib import Path

from effitrain.errors import UsageError, io_failure

log = logging.getLogger("effitrain")

META = ".effitrain"
RUN_FILE = "run.json"
LOCK_FILE = "lock"


class RunClaim:
    """This invocation's hold on a run directory: the lock, and the entries that were there before it (what a
    failure must leave).

    Args:
        run_dir: the run (or sweep) directory.
        continuing: the directory may already hold an effitrain run (resume, a restarted worker, a resumed sweep).
        lock: take the one-writer lock (the launching process; workers run under their launcher's lock).
    """

    def __init__(self, run_dir: Path, *, continuing: bool = False, lock: bool = True):
        self.run_dir = Path(run_dir)
        self.created_dir = False
        self.before: set[str] = set()
        self._lock_fd: int | None = None
        self._claim(continuing)
        if lock:
            self._lock()

    # --- claiming -------------------------------------------------------------------------------------------------
    def _claim(self, continuing: bool) -> None:
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
        foreign = self.before - {META, f"{META}/{RUN_FILE}", f"{META}/{LOCK_FILE}", ".hydra",
                                 ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"}
        ours = run_id(d) is not None
        if self.before and not ours:
            example = sorted(self.before)[0]
            raise UsageError(f"{d} already holds files effitrain did not write (e.g. {example!r}); a run writes only "
                             "into a new or empty directory: choose another hydra.run.dir")
        if ours and foreign and not continuing:
            raise UsageError(f"{d} holds the effitrain run {run_id(d)}: continue it with effitrain resume {d}, or "
                             "choose another hydra.run.dir for a new run")
        if not ours:
            self._write_identity()

    def _write_identity(self) -> None:
        meta = self.run_dir / META
        try:
            meta.mkdir(exist_ok=True)
            write_file(meta / RUN_FILE, json.dumps({"run_id": uuid.uuid4().hex, "created": time.time(),
                                                    "host": socket.gethostname()}))
        except OSError as e:
            raise io_failure(e, meta, doing="cannot write the run's identity") from None

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
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock; the file stays (it belongs to the run)
            self._lock_fd = None

    # --- failure --------------------------------------------------------------------------------------------------
    def undo(self) -> list[str]:
        """After a failure: remove what this invocation created, unless the directory now holds a complete
        checkpoint (then everything stays: the run is resumable). The removed entries (relative paths)."""
        from effitrain.checkpoint.layout import complete_checkpoints

        self.release()
        d = self.run_dir
        if not d.is_dir() or complete_checkpoints(d / "checkpoints"):
            return []
        new = sorted(_entries(d) - self.before, key=lambda p: p.count("/"), reverse=True)
        if self.created_dir and not self.before - {META, f"{META}/{RUN_FILE}", f"{META}/{LOCK_FILE}"}:
            shutil.rmtree(d, ignore_errors=True)  # all of it is this invocation's
            return new
        for rel in new:
            path = d / rel
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir() if not any(path.iterdir()) else None
                else:
                    path.unlink()
            except OSError:
                pass
        return new


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
    except PermissionError:
        return True
    return True


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
    """The run's id, written first where no claim has written one (a test or benchmark calling train.run, a worker
    torchrun started from outside, a reproduction): every checkpoint names the run it belongs to. Raises OSError."""
    found = run_id(run_dir)
    if found is None:
        meta = Path(run_dir) / META
        meta.mkdir(exist_ok=True)
        write_file(meta / RUN_FILE, json.dumps({"run_id": uuid.uuid4().hex, "created": time.time(),
                                                "host": socket.gethostname()}))
        found = run_id(run_dir)
    if found is None:  # a run.json that is a symlink or unreadable and stays so
        raise OSError(f"{run_dir / META / RUN_FILE} cannot be read back")
    return found


# --- writing run files ------------------------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: str | bytes) -> None:
    """Write `path` whole: a new temporary file beside it (never an existing one, never through a symlink), fsynced,
    renamed over `path` (which replaces a symlink there, not its target), the directory fsynced. Raises OSError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def open_append(path: Path, *, binary: bool = False):
    """A run file opened for appending, refusing a symlink (O_NOFOLLOW: ELOOP) -- a received directory's
    `train.log -> ~/.bashrc` is not written through. Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "ab" if binary else "a", encoding=None if binary else "utf-8")


def inside(root: Path, path: Path) -> bool:
    """Whether `path` (symlinks resolved) lies inside `root` (resolved)."""
    root, path = Path(os.path.realpath(root)), Path(os.path.realpath(path))
    return path == root or root in path.parents
