"""Sweeps write a summary table; reproduce reruns a run bit-for-bit and catches a diverged one."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import run_cli, tiny_overrides
from effitrain.runs import compare_losses


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, corpus, cache_dir):
    """`-m optimizer.lr=1e-3,3e-3 +precision=fp32,bf16` on the tiny run: 4 jobs."""
    cwd = tmp_path_factory.mktemp("sweep")
    out = run_cli("train", "-m", "optimizer.lr=1e-3,3e-3", "+precision=fp32,bf16",
                  *tiny_overrides(corpus, cache_dir, "max_steps=3"), "hydra.sweep.dir=sweep", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "sweep", out.stdout


def test_sweep_summary_has_one_row_per_job(sweep_dir):
    directory, stdout = sweep_dir
    rows = list(csv.DictReader((directory / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert {r["overrides"] for r in rows} == {f"optimizer.lr={lr} precision={p}" for lr in ("0.001", "0.003")
                                             for p in ("fp32", "bf16")}  # only what varies between jobs
    for r in rows:
        assert r["status"] == "ok" and float(r["final_val_loss"]) > 0 and float(r["median_tokens_per_s"]) > 0
        assert float(r["mem_reserved_peak_gib"]) > 0
    md = (directory / "summary.md").read_text().splitlines()
    assert len(md) == 2 + 4 and md[0].startswith("| job | overrides |")
    assert "precision=bf16" in stdout and "final_val_loss" in stdout


def test_reproduce_sweep_job_is_identical_then_detects_divergence(sweep_dir, tmp_path):
    directory, _ = sweep_dir
    job = directory / "0"  # fp32 on CPU: must match bit-for-bit
    out = run_cli("reproduce", str(job), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "identical: all 3 step losses match bit-for-bit" in out.stdout
    [new_dir] = list((tmp_path / "outputs").glob("*/*_reproduce-0"))
    assert json.loads((new_dir / "reproduce.json").read_text())["matched"] is True
    assert (new_dir / ".hydra" / "config.yaml").read_text() == (job / ".hydra" / "config.yaml").read_text()

    # tamper with the original's step-2 loss: the verdict must name step 2 and exit 1
    lines = (job / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["loss"] += 0.5
    lines[1] = json.dumps(record)
    (job / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = run_cli("reproduce", str(job), cwd=tmp_path)
    assert out.returncode == 1
    assert "diverged at step 2" in out.stdout


def test_compare_losses_verdicts():
    assert compare_losses([1.0, 2.0], [1.0, 2.0], rtol=1e-3) == ("identical: all 2 step losses match bit-for-bit", True)
    verdict, ok = compare_losses([1.0, 2.0], [1.0, 2.0001], rtol=1e-3)
    assert ok and verdict.startswith("within tolerance")
    verdict, ok = compare_losses([1.0, 2.0, 3.0], [1.0, 2.5, 3.0], rtol=1e-3)
    assert not ok and verdict.startswith("diverged at step 2")
    assert compare_losses([1.0, 2.0], [1.0], rtol=1e-3)[1] is False
    verdict, ok = compare_losses([2.0, 1.5], [2.0, float("nan")], rtol=1e-3)
    assert not ok and verdict.startswith("diverged at step 2")
