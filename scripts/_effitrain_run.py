"""Shared by the bench scripts: one `effitrain train` run in its own process (fresh memory peaks)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run_effitrain(overrides: list[str], run_dir: Path) -> dict:
    """Train with the real CLI into run_dir; its summary.json (exits with the error tail on failure)."""
    cmd = [sys.executable, "-m", "effitrain.cli", "train", *overrides, f"hydra.run.dir={run_dir}",
           "logging.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(overrides)}\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def bench_parser(description: str, *, steps: int, json_default: str) -> argparse.ArgumentParser:
    """The arguments every table-of-runs bench takes: steps per run, the JSON path, extra effitrain overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--json", default=json_default)
    parser.add_argument("overrides", nargs="*", help="extra effitrain overrides for every run, e.g. model=llama-20m")
    return parser
