"""`effitrain reproduce RUN_DIR`: rerun a finished run from its saved config and compare it step by step.

Compared at every step: loss, grad_norm, lr and (where evaluated) val_loss. Exit 0: identical (bit-for-bit),
3: within --rtol, 1: diverged (or, with --exact, anything but identical). `--from-step K` restarts from the
original's checkpoint at step K and checks only the steps after it: the fast way to verify a long run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from effitrain.errors import UsageError


def reproduce_run(original: Path, *, rtol: float, exact: bool = False, from_step: int | None = None,
                  allow_external: bool = False) -> int:
    """Rerun, compare with the original's metrics.jsonl, print the verdict; the exit code."""
    from effitrain.checks import check_all
    from effitrain.received import load_run_config
    from effitrain.runs import read_records, reproduce_dir

    cfg = load_run_config(original, allow_external=allow_external)
    reference = read_records(original)
    if not reference:
        raise UsageError(f"{original} has no metrics.jsonl to compare against (did the run finish?)")
    check_all(cfg)
    source = _checkpoint_at(original, cfg, from_step) if from_step is not None else None
    claim = reproduce_dir(original)
    try:
        return _rerun(original, cfg, claim.run_dir, reference, source=source, rtol=rtol, exact=exact,
                      from_step=from_step)
    except (Exception, KeyboardInterrupt):
        claim.undo()  # only what this invocation made (a complete checkpoint keeps it whole)
        raise
    finally:
        claim.release()


def _rerun(original: Path, cfg, run_dir: Path, reference: list[dict], *, source, rtol: float, exact: bool,
           from_step: int | None) -> int:
    from effitrain.engine.train import launch
    from effitrain.files import write_file
    from effitrain.logging import console
    from effitrain.runs import DIVERGED, IDENTICAL, compare_records, read_records

    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):  # the new run is itself reproducible
        if (original / ".hydra" / name).is_file():
            shutil.copy2(original / ".hydra" / name, run_dir / ".hydra" / name)
    if "dir" in cfg.checkpoint:
        cfg.checkpoint.dir = None  # the reproduction's checkpoints go in its own directory, never the original's
    if source is not None:
        _adopt(source, run_dir)
    launch(cfg, run_dir, resume=source is not None)
    verdict, code = compare_records(reference, read_records(run_dir), rtol=rtol, after_step=from_step or 0)
    if exact and code != IDENTICAL:
        code = DIVERGED
    write_file(run_dir / "reproduce.json", json.dumps(
        {"original": str(original), "verdict": verdict, "exit_code": code, "matched": code != DIVERGED,
         "rtol": rtol, "exact": exact, "from_step": from_step}, indent=2))
    console().print(f"reproduce {original} -> {run_dir}: {verdict}", soft_wrap=True)  # one line, for grep
    return code


def _checkpoint_at(original: Path, cfg, step: int) -> Path:
    from effitrain.checkpoint.layout import CheckpointError, default_root, resolve

    if cfg.checkpoint.kind == "off":
        raise UsageError(f"--from-step: {original} was trained with checkpoint=off; reproduce it whole")
    try:
        return resolve(default_root(original, cfg.checkpoint.dir), step=step)
    except CheckpointError as e:
        raise UsageError(f"--from-step {step}: {e}") from None


def _adopt(source: Path, run_dir: Path) -> None:
    """The original's checkpoint as the reproduction's own: its files linked, its manifest sealed anew naming the new
    run (and the run it came from). A run resumes only its own checkpoints; reproduce --from-step is the explicit
    way to continue another run's whole state. The files keep their checksums: the load verifies them."""
    from effitrain.checkpoint.layout import MANIFEST, MARKER, read_manifest, sealed
    from effitrain.errors import io_failure
    from effitrain.files import write_file
    from effitrain.rundir import ensure_run_id

    manifest = read_manifest(source)  # checked against its own checksum before its file list is trusted
    target = run_dir / "checkpoints" / source.name
    try:
        new_id = ensure_run_id(run_dir)
        _link_tree(source, target, skip={MANIFEST, MARKER})
        write_file(target / MARKER, new_id)
        write_file(target / MANIFEST, sealed(manifest | {"run_id": new_id, "adopted_from": manifest.get("run_id")}))
    except OSError as e:
        raise io_failure(e, target, doing=f"cannot take over {source}") from None


def _link_tree(source: Path, target: Path, *, skip: set[str]) -> None:
    """Hard-link the checkpoint's files (no copy of a large checkpoint; a copy across file systems)."""
    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.name in skip:
            continue
        try:
            os.link(f, target / f.name)
        except OSError:
            shutil.copy2(f, target / f.name)
