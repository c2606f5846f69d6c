"""Where checkpoints live, what their manifest proves, and how to tell a complete one (no torch: the CLI reads these
before anything starts).

    <checkpoint dir>/step-N/             complete: DCP shards + .metadata + .run_id + manifest.json (written last,
                                         then the directory renamed)
    <checkpoint dir>/step-N.tmp/         being written, or left by a kill mid-save: never loaded; .run_id (written
                                         first) says which run may remove it
    <checkpoint dir>/step-N.unverified/  a checkpoint that failed verification when its run resumed: kept for
                                         inspection, never loaded, never rotated

The manifest names the run (`run_id`, from RUN_DIR/.effitrain/run.json) and carries the size and xxh3-128 of every
file of the checkpoint, and a checksum of itself: a flipped byte anywhere is found before anything is loaded.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import stat
from pathlib import Path

import xxhash

from effitrain.errors import UsageError, first_line

MANIFEST = "manifest.json"
MARKER = ".run_id"  # the id of the run whose save this is: written first into step-N.tmp
HASH = "xxh3_128"  # xxhash's XXH3 128-bit: ~8 GB/s on one core here, a stable well-kept format
STEP_NAME = re.compile(r"step-(\d+)")  # a complete checkpoint's directory name (step-N.tmp is being written)
_STEP = STEP_NAME
_HEX = re.compile(r"[0-9a-f]{32}")
_CHUNK = 64 << 20
_MAX_MANIFEST = 64 << 20  # far beyond any real one (a file entry is ~100 bytes): a bigger one is not read


class CheckpointError(UsageError):
    """A checkpoint that cannot be written or loaded: one line, the run stops, earlier checkpoints untouched."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files differ from what its manifest recorded (or whose manifest differs from itself): it
    changed after it was saved. A resumed run passes over it to its newest checkpoint that verifies."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}.tmp"


def default_root(run_dir: Path, configured: str | None) -> Path:
    """checkpoint.dir, or <run dir>/checkpoints."""
    return Path(configured).expanduser() if configured else run_dir / "checkpoints"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under root, oldest first: a step-N directory with its manifest (the
    rename that makes step-N comes after the manifest; a file missing since is verification's to report, not a
    reason to pass it over in silence)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP.fullmatch(p.name)) and (p / MANIFEST).is_file()]
    return sorted(found)


def latest(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1][1] if done else None


def read_manifest(path: Path) -> dict:
    """The manifest of the checkpoint at `path`, checked against its own checksum and for the fields a load uses.

    Raises CorruptCheckpoint (it changed since it was written) or CheckpointError (not an effitrain checkpoint of
    this version)."""
    where = path / MANIFEST
    try:
        if where.stat().st_size > _MAX_MANIFEST:
            raise CorruptCheckpoint(f"{where}: {where.stat().st_size:,} bytes, not a manifest")
        manifest = json.loads(read_regular(where))  # never through a symlink, nor into a FIFO
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, not UTF-8; RecursionError: [[[[...
        raise CorruptCheckpoint(f"{where} is not readable JSON ({first_line(e)}): not a complete checkpoint") from None
    if not isinstance(manifest, dict):
        raise CorruptCheckpoint(f"{where} is not a JSON object: not a complete checkpoint")
    if "checksum" not in manifest and {"files", "hash", "run_id"} & manifest.keys():
        raise CorruptCheckpoint(f"{where} has lost its checksum (it changed after it was saved)")
    if "checksum" not in manifest:
        raise CheckpointError(f"{where} has no checksum: it predates verified checkpoints (or is not effitrain's), so "
                              "it is not loaded")
    if manifest["checksum"] != manifest_checksum(manifest):
        raise CorruptCheckpoint(f"{where}: its checksum does not match its contents (it changed after it was saved)")
    _check_fields(manifest, where)
    return manifest


def manifest_checksum(manifest: dict) -> str:
    """xxh3-128 of the manifest's canonical JSON (its own `checksum` left out)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def sealed(manifest: dict) -> str:
    """The manifest's text, its own checksum added."""
    return json.dumps(manifest | {"checksum": manifest_checksum(manifest)}, indent=2)


def _check_fields(manifest: dict, where: Path) -> None:
    """The fields a load reads, with their types: a manifest whose checksum matches but was made by hand (or by
    another tool) is one line, not a KeyError later."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what}; not an effitrain checkpoint this version can load")

    for key, least in (("step", 0), ("world_size", 1)):
        if type(manifest.get(key)) is not int or manifest[key] < least:
            raise bad(f"{key} is {manifest.get(key)!r}")
    if not isinstance(manifest.get("model_only", False), bool) or manifest.get("hash") != HASH:
        raise bad(f"model_only={manifest.get('model_only')!r}, hash={manifest.get('hash')!r} (expected {HASH})")
    if not isinstance(manifest.get("run_id"), (str, type(None))):
        raise bad(f"run_id is {manifest['run_id']!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or ".metadata" not in files:
        raise bad("no file list with .metadata")
    for name, entry in files.items():
        if not plain_name(name) or not isinstance(entry, dict) or type(entry.get("bytes")) is not int \
                or entry["bytes"] < 0 or not isinstance(entry.get(HASH), str) or not _HEX.fullmatch(entry[HASH]):
            raise bad(f"file entry {name!r}: {entry!r}")


def plain_name(name) -> bool:
    """A file name inside the checkpoint directory: no path, nothing outside it."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


# --- file checksums --------------------------------------------------------------------------------------------

def _open_regular(path: Path):
    """`path` opened for reading if it is a regular file: never through a symlink, nor into a FIFO (which would
    block) or a device. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    f = open(fd, "rb", buffering=0)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return f


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file at `path` (see _open_regular). Raises OSError."""
    with _open_regular(path) as f:
        return f.readall()


def file_digest(path: Path, *, sync: bool = False) -> tuple[int, str]:
    """(bytes, xxh3-128 hex) of the regular file at `path`; `sync`: fsync it too (the data reaches the disk before
    the manifest that vouches for it). Raises OSError.

    Hashed through mmap: no copy into a buffer, half the time of read() here (llama-150m's 913 MiB: 0.08 vs 0.15 s).
    A file truncated by someone else while it is hashed would end the process with SIGBUS; checkpoint files are
    written once and never truncated by effitrain."""
    with _open_regular(path) as f:
        size, digest = os.fstat(f.fileno()).st_size, xxhash.xxh3_128()
        if size:
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                for start in range(0, size, _CHUNK):
                    digest.update(view[start:start + _CHUNK])
        if sync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def checksum_files(directory: Path, *, sync: bool) -> dict:
    """{name: {"bytes", "xxh3_128"}} of every file in a checkpoint directory but the manifest and the marker.
    Raises OSError."""
    files = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name in (MANIFEST, MARKER):
            continue
        size, digest = file_digest(Path(entry.path), sync=sync)
        files[entry.name] = {"bytes": size, HASH: digest}
    return files


def verify_file(path: Path, name: str, files: dict, *, deep: bool = True) -> int:
    """Check one file of the checkpoint at `path` against the manifest's `files`: its size, and (`deep`) its
    checksum. The bytes read. Raises CorruptCheckpoint naming the file."""
    if name not in files:
        raise CheckpointError(f"{path}: {name!r} is not among the files its {MANIFEST} vouches for; nothing was "
                              "loaded")
    where = path / name
    want = files[name]
    try:
        if not deep:
            size = os.stat(where, follow_symlinks=False).st_size
            digest = want[HASH]
        else:
            size, digest = file_digest(where)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{where} is missing (the manifest lists it)") from None
    except OSError as e:
        raise CorruptCheckpoint(f"{where} cannot be read ({e.strerror or first_line(e)})") from None
    if size != want["bytes"]:
        raise CorruptCheckpoint(f"{where} has {size:,} bytes and its manifest says {want['bytes']:,}")
    if digest != want[HASH]:
        raise CorruptCheckpoint(f"{where}: its {HASH} checksum differs from the manifest's (the file changed after "
                                "it was saved)")
    return size if deep else 0


def verify(path: Path, manifest: dict, *, deep: bool = True) -> None:
    """Every file the manifest lists: present, its size, and (`deep`) its checksum. Raises CorruptCheckpoint."""
    for name in manifest["files"]:
        verify_file(path, name, manifest["files"], deep=deep)


# --- whose checkpoint ------------------------------------------------------------------------------------------

def marker_owner(path: Path) -> str | None:
    """The run id in a checkpoint directory's marker (None: none, unreadable, or a symlink)."""
    try:
        with _open_regular(path / MARKER) as f:
            text = f.read(200).decode().strip()
    except (OSError, ValueError):
        return None
    return text if re.fullmatch(r"[0-9A-Za-z_-]{1,100}", text) else None


def owner(path: Path) -> str | None:
    """The run a checkpoint directory belongs to: its manifest's run id, or (a manifest that does not verify) its
    marker's."""
    try:
        return read_manifest(path).get("run_id")
    except CheckpointError:
        return marker_owner(path)


def check_owner(path: Path, manifest: dict, run_id: str | None) -> None:
    """Refuse (one line) to resume a checkpoint that is not this run's own: only `checkpoint.resume_from` starts a
    run from another run's weights."""
    theirs = manifest.get("run_id")
    if theirs is None:
        raise CheckpointError(f"{path} predates run ids: resume cannot tell it is this run's; start a new run from it "
                              f"with checkpoint.resume_from={path}")
    if theirs != run_id:
        raise CheckpointError(f"{path} belongs to run {theirs}, not to this run ({run_id or 'no run id'}): a run "
                              f"resumes only its own checkpoints; start a new run from it with "
                              f"checkpoint.resume_from={path}")


def own_checkpoints(root: Path, run_id: str | None):
    """This run's complete checkpoints under root, newest first, as (path, manifest, None) or, where the manifest
    does not verify but the marker names this run, (path, None, the CorruptCheckpoint). Raises CheckpointError at
    the first one that is another run's (or predates run ids): it is refused, not passed over."""
    for _, path in reversed(complete_checkpoints(root)):
        try:
            manifest = read_manifest(path)
        except CorruptCheckpoint as e:
            if marker_owner(path) != run_id or run_id is None:
                raise CheckpointError(f"{e}; nothing shows it is this run's, so it is neither loaded nor passed "
                                      "over: move it away to resume from an earlier one") from None
            yield path, None, e
            continue
        check_owner(path, manifest, run_id)
        yield path, manifest, None


def newest_verified(root: Path, run_id: str | None, *, deep: bool) -> tuple[Path | None, list[CheckpointError]]:
    """This run's newest checkpoint that verifies (`deep`: every checksum; else the manifest and the files' sizes),
    and why each newer one did not."""
    passed: list[CheckpointError] = []
    for path, manifest, error in own_checkpoints(root, run_id):
        if error is None:
            try:
                verify(path, manifest, deep=deep)
                return path, passed
            except CorruptCheckpoint as e:
                error = e
        passed.append(error)
    return None, passed


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that failed verification to step-N.unverified (-2, -3, ...): never loaded or rotated
    again, kept for whoever wants to look. Its new path."""
    target, k = path.with_name(f"{path.name}.unverified"), 2
    while target.exists():
        target, k = path.with_name(f"{path.name}.unverified-{k}"), k + 1
    path.rename(target)
    return target


def resolve(path: str | Path, *, step: int | None = None) -> Path:
    """A checkpoint directory from what a user names: a step-N dir, a checkpoints/ dir or a run dir (its latest, or
    step `step`)."""
    path = Path(path).expanduser()
    if (path / MANIFEST).is_file():
        return path
    for root in (path / "checkpoints", path):
        done = dict(complete_checkpoints(root))
        if done:
            if step is None:
                return done[max(done)]
            if step in done:
                return done[step]
            raise CheckpointError(f"{root} has no complete checkpoint of step {step} (it has: "
                                  f"{', '.join(str(s) for s in sorted(done))})")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    raise CheckpointError(f"{path} holds no complete checkpoint (step-N/ with {MANIFEST})")
