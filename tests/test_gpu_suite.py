"""scripts/gpu_suite.py's dry run: every case of the GPU suite composes and checks on this CPU, and its bench
scripts still take the flags and names the suite passes them -- so the suite cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "scripts" / "gpu_suite.py"


def dry_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "gpu_suite.json").read_text()) if (tmp_path / "gpu_suite.json").exists() else {}
    return proc, report


def test_dry_run_composes_every_case(tmp_path):
    proc, report = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [r["case"] for r in report["rows"]]
    assert {"mfu-llama-1b-bf16", "mfu-llama-1b-bf16-compile", "mfu-llama-1b-fp8-compile", "peers", "nccl-ddp",
            "nccl-fsdp", "nccl-tp", "nccl-fsdp-tp", "fp8-vs-bf16", "estimate-vs-cuda", "prune-2of4",
            "checkpoint"} == set(names)
    assert all(r["status"] == "ok (dry run)" for r in report["rows"])
    assert sum(r["composed"] for r in report["rows"]) >= 12  # every train override set went through compose
    assert report["wall_s"] < 60
    assert "| nccl-fsdp-tp |" in (tmp_path / "gpu_suite.md").read_text()


def test_dry_run_fails_when_a_case_stops_composing(tmp_path):
    proc, report = dry_run(tmp_path, "--only", "fp8-vs-bf16,peers", "--override", "model.hidden_sise=64")
    assert proc.returncode == 1
    rows = {r["case"]: r for r in report["rows"]}
    assert rows["fp8-vs-bf16"]["status"] == "failed" and "model.hidden_sise" in rows["fp8-vs-bf16"]["error"]
    assert rows["peers"]["status"] == "ok (dry run)"  # bench_peers builds its own configs: nothing to override


def test_bad_arguments_are_one_line_exit_2(tmp_path):
    for args in (["--only", "nope"], ["--budget", "0"], ["--override", "model"]):
        proc = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("gpu_suite: "), proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and not list(tmp_path.iterdir())  # one line, nothing written
