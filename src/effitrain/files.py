"""How effitrain writes a file, in one place: whole (a new temporary beside it, fsynced, renamed, the directory
fsynced), never through a symlink; appends that refuse a link. Run files (rundir.py), checkpoints, metrics and logs
all write through here. No torch."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from effitrain.errors import UsageError


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


def open_append(path: Path, *, binary: bool = False, truncate: bool = False):
    """A run file opened for appending (`truncate`: emptied first, as a fresh run's metrics.jsonl), refusing a
    symlink (O_NOFOLLOW: ELOOP) -- a received directory's `train.log -> ~/.bashrc` is not written through. Raises
    OSError."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{path} is a symlink: effitrain writes a run's files only as files of the run "
                             "directory, never through a link (remove it)") from None
        raise
    if binary:  # unbuffered: each write() is one system call, so one line is written whole
        return os.fdopen(fd, "ab", buffering=0)
    return os.fdopen(fd, "a", encoding="utf-8")
