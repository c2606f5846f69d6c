"""`effitrain reproduce RUN_DIR`: rerun a finished run from its saved config and compare the losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from effitrain.errors import UsageError


def reproduce_run(original: Path, *, rtol: float) -> int:
    """Rerun, compare per-step loss with the original's metrics.jsonl, print the verdict; 0 = match, 1 = not."""
    from effitrain.checks import check_all
    from effitrain.compose import load_run_config
    from effitrain.launch import launch
    from effitrain.logs import console
    from effitrain.runs import compare_losses, read_losses, reproduce_dir

    cfg = load_run_config(original)
    reference = read_losses(original)
    if not reference:
        raise UsageError(f"{original} has no metrics.jsonl to compare against (did the run finish?)")
    check_all(cfg)
    run_dir = reproduce_dir(original)
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):  # the new run is itself reproducible
        if (original / ".hydra" / name).is_file():
            shutil.copy2(original / ".hydra" / name, run_dir / ".hydra" / name)
    launch(cfg, run_dir)
    verdict, matched = compare_losses(reference, read_losses(run_dir), rtol=rtol)
    (run_dir / "reproduce.json").write_text(json.dumps(
        {"original": str(original), "verdict": verdict, "matched": matched, "rtol": rtol}, indent=2))
    console().print(f"reproduce {original} -> {run_dir}: {verdict}", soft_wrap=True)  # one line, for grep
    return 0 if matched else 1
