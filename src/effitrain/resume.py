"""`effitrain resume RUN_DIR [key=value...]`: continue a run in place from its latest complete checkpoint.

The saved config is the run's (overrides may change plain keys, e.g. raise max_steps so a WSD schedule's stable
phase extends); metrics.jsonl keeps the steps up to the checkpoint and continues from the next one. A run
directory someone sent is data: see compose.load_run_config and checkpoint.store (nothing in it runs code).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from effitrain.errors import UsageError


def resume_run(run_dir: Path, overrides: list[str], *, allow_rendezvous: bool = False) -> int:
    """Resume RUN_DIR; the exit code (0: the run reached max_steps)."""
    from omegaconf import OmegaConf

    from effitrain.checkpoint.layout import CheckpointError, default_root, newest_verified
    from effitrain.checks import check_all
    from effitrain.compose import apply_overrides, load_run_config
    from effitrain.launch import launch
    from effitrain.rundir import run_id

    cfg = apply_overrides(load_run_config(run_dir, allow_rendezvous=allow_rendezvous), overrides)
    check_all(cfg)
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
                         f"(effitrain resume {run_dir} max_steps={2 * cfg.max_steps})")
    if overrides:  # the run directory's config stays the one that produced its later steps
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    with (run_dir / "resumes.jsonl").open("a") as f:
        f.write(json.dumps({"from_step": step, "overrides": overrides, "time": time.time()}) + "\n")
    launch(cfg, run_dir, resume=True)
    return 0
