"""Shared by the bench scripts: one `effitrain train` run in its own process (fresh memory peaks)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CLI = ["-m", "effitrain.cli"]  # what `effitrain` runs


def run_effitrain(overrides: list[str], run_dir: Path, *, entry: list[str] = CLI, env: dict | None = None) -> dict:
    """Train with the real CLI into run_dir; its summary.json (exits with the error tail on failure).

    entry: the interpreter arguments before `train` (a script of its own that wraps the CLI, e.g. with a probe).
    """
    cmd = [sys.executable, *entry, "train", *overrides, f"hydra.run.dir={run_dir}", "logging.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
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


def machine() -> str:
    """The GPU's name, or the CPU's model, cores and torch threads: the line each table names its machine by."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"


def report(rows: list[tuple[str, str]], result: dict, out: Path, *, width: int) -> None:
    """Print a label/value table (values right-aligned in `width`) and write `result` as JSON to `out`."""
    for label, value in rows:
        print(f"{label:<24} {value:>{width}}")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
