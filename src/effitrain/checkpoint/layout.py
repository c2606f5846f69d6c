"""Where checkpoints live and how to tell a complete one (no torch: the CLI reads these before anything starts).

    <checkpoint dir>/step-N/       complete: DCP shards + .metadata + manifest.json (written last, then renamed)
    <checkpoint dir>/step-N.tmp/   being written, or left by a kill mid-save: never loaded
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from effitrain.errors import UsageError

MANIFEST = "manifest.json"
STEP_NAME = re.compile(r"step-(\d+)")  # a complete checkpoint's directory name (step-N.tmp is one being written)
_STEP = STEP_NAME


class CheckpointError(UsageError):
    """A checkpoint that cannot be written or loaded: one line, the run stops, earlier checkpoints untouched."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}.tmp"


def default_root(run_dir: Path, configured: str | None) -> Path:
    """checkpoint.dir, or <run dir>/checkpoints."""
    return Path(configured).expanduser() if configured else run_dir / "checkpoints"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP.fullmatch(p.name)) and (p / MANIFEST).is_file() and (p / ".metadata").is_file()]
    return sorted(found)


def latest(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1][1] if done else None


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable {MANIFEST} ({e}); not a complete effitrain checkpoint") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{path}/{MANIFEST} has no step: not an effitrain checkpoint")
    return manifest


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
