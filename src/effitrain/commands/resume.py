"""`effitrain resume RUN_DIR [key=value...]`: continue a run in place from its latest complete checkpoint.

The saved config is the run's (overrides may change plain keys, e.g. raise max_steps so a WSD schedule's stable
phase extends); metrics.jsonl keeps the steps up to the checkpoint and continues from the next one. A run
directory someone sent is data: see effitrain.received and checkpoint.store (nothing in it runs code).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from effitrain.errors import Diverged, Preempted, UsageError


def resume_run(run_dir: Path, overrides: list[str], *, allow_external: bool = False) -> int:
    """Resume RUN_DIR; the exit code (0: the run reached max_steps)."""
    from omegaconf import OmegaConf

    from effitrain.checkpoint.layout import CheckpointError, default_root, newest_verified
    from effitrain.checks import check_all
    from effitrain.compose import apply_overrides
    from effitrain.engine.train import launch
    from effitrain.files import write_file
    from effitrain.parallel import mixes_dtensors
    from effitrain.received import load_run_config, refuse_links
    from effitrain.rundir import RunClaim, run_id

    # what the saved config asks for is checked there; the user's own overrides are the user's to give
    saved_parallel = load_run_config(run_dir, allow_external=allow_external).parallel
    cfg = apply_overrides(load_run_config(run_dir, allow_external=allow_external), overrides)
    check_all(cfg)
    if mixes_dtensors(saved_parallel) != mixes_dtensors(cfg.parallel):
        ep = saved_parallel.ep if "ep" in saved_parallel else 1
        raise UsageError(f"{run_dir} was trained with parallel.ep={ep}: its optimizer state is grouped for it under "
                         f"parallel=ddp, so resume keeps parallel.ep={ep}")
    if cfg.checkpoint.kind == "off":
        raise UsageError(f"{run_dir} was trained with checkpoint=off: it has nothing to resume from")
    # the step it will continue from: its newest own checkpoint whose manifest and file sizes check out (the
    # checksums are verified by the load itself, which falls back further if one differs)
    root = default_root(run_dir, cfg.checkpoint.dir)
    checkpoint, passed = newest_verified(root, run_id(run_dir), deep=False)
    if checkpoint is None and passed:
        raise CheckpointError(f"{passed[0]}; and no earlier checkpoint of this run in {root} verifies")
    if checkpoint is None:
        raise UsageError(f"{run_dir} has no complete checkpoint to resume from (none was saved before it stopped)")
    step = int(checkpoint.name.removeprefix("step-"))
    if step >= cfg.max_steps:
        raise UsageError(f"{run_dir} is complete at step {step} = max_steps; raise it to train on "
                         f"(effitrain resume {run_dir} max_steps={2 * step})")
    refuse_links(run_dir)  # what resume writes there must be the run's own files, not links to elsewhere
    claim = RunClaim(run_dir, mode="adopt")  # one writer: a second resume (or a train) into it is refused
    saved = run_dir / ".hydra" / "config.yaml"
    before = saved.read_bytes()
    try:
        if overrides:  # the run directory's config stays the one that produced its later steps
            write_file(saved, OmegaConf.to_yaml(cfg))
        try:
            launch(cfg, run_dir, resume=True)
        except (Preempted, Diverged):  # it trained: the record stands, and so does the config that trained it
            _record(run_dir, step=step, overrides=overrides)
            raise
        except BaseException:  # nothing to show for it: the run directory's config is as it was
            if overrides:
                write_file(saved, before)
            raise
        _record(run_dir, step=step, overrides=overrides)
    finally:
        claim.release()
    return 0


def _record(run_dir: Path, *, step: int, overrides: list[str]) -> None:
    from effitrain.files import open_append

    with open_append(run_dir / "resumes.jsonl") as f:
        f.write(json.dumps({"from_step": step, "overrides": overrides, "time": time.time()}) + "\n")
