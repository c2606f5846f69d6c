"""`effitrain reproduce RUN_DIR`: rerun a finished run from its saved config and compare the losses."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from effitrain.errors import UsageError


def load_saved_config(run_dir: Path):
    """RUN_DIR's composed config, checked against the schema (nothing is composed anew)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from effitrain.config import TrainConfig

    saved = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory (give a run directory such as outputs/<date>/<time>_run)")
    if not saved.is_file():
        raise UsageError(f"{run_dir} has no saved config (.hydra/config.yaml); give a directory effitrain train wrote")
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(saved))
    except OmegaConfBaseException as e:
        raise UsageError(f"{saved} does not match effitrain's config schema: {str(e).splitlines()[0]}") from None


def new_run_dir(original: Path, outputs: Path = Path("outputs")) -> Path:
    """outputs/<date>/<time>_reproduce-<original name>, never an existing directory."""
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    base = outputs / f"{stamp}_reproduce-{original.resolve().name}"
    candidate, k = base, 1
    while candidate.exists():
        candidate, k = base.with_name(f"{base.name}-{k}"), k + 1
    return candidate


def reproduce_run(original: Path, *, rtol: float) -> int:
    """Rerun, compare per-step loss with the original's metrics.jsonl, print the verdict; 0 = match, 1 = not."""
    from effitrain.checks import check_all
    from effitrain.launch import launch
    from effitrain.logs import console
    from effitrain.runs import compare_losses, read_losses

    cfg = load_saved_config(original)
    reference = read_losses(original)
    if not reference:
        raise UsageError(f"{original} has no metrics.jsonl to compare against (did the run finish?)")
    check_all(cfg)
    run_dir = new_run_dir(original)
    (run_dir / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):  # the new run is itself reproducible
        if (original / ".hydra" / name).is_file():
            shutil.copy2(original / ".hydra" / name, run_dir / ".hydra" / name)
    launch(cfg, run_dir)
    verdict, matched = compare_losses(reference, read_losses(run_dir), rtol=rtol)
    (run_dir / "reproduce.json").write_text(json.dumps(
        {"original": str(original), "verdict": verdict, "matched": matched, "rtol": rtol}, indent=2))
    console().print(f"reproduce {original} -> {run_dir}: {verdict}", soft_wrap=True)  # one line, for grep
    return 0 if matched else 1
