"""Sweeps write a summary table; reproduce reruns a run bit-for-bit and catches a diverged one."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import run_cli, tiny_overrides
from effitrain.runs import DIVERGED, IDENTICAL, WITHIN, compare_records


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


@pytest.mark.extended  # 35 s, CI time; reproduce of a run is in the default run (tests/test_export.py)
def test_reproduce_sweep_job_is_identical_then_detects_divergence(sweep_dir, tmp_path):
    directory, _ = sweep_dir
    job = directory / "0"  # fp32 on CPU: must match bit-for-bit
    out = run_cli("reproduce", str(job), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "identical: 3 steps, loss, grad_norm, lr and val_loss bit-for-bit" in out.stdout
    [new_dir] = list((tmp_path / "outputs").glob("*/*_reproduce-0"))
    assert json.loads((new_dir / "reproduce.json").read_text())["exit_code"] == IDENTICAL
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


def _records(values, key="loss"):
    return [{"step": i, "loss": 1.0, "grad_norm": 1.0, "lr": 0.1, key: v} for i, v in enumerate(values, 1)]


def test_compare_records_verdicts():
    same = compare_records(_records([1.0, 2.0]), _records([1.0, 2.0]), rtol=1e-3)
    assert same == ("identical: 2 steps, loss, grad_norm, lr and val_loss bit-for-bit", IDENTICAL)
    verdict, code = compare_records(_records([1.0, 2.0]), _records([1.0, 2.0001]), rtol=1e-3)
    assert code == WITHIN and verdict.startswith("within tolerance")
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        verdict, code = compare_records(_records([1.0, 2.0, 3.0], key), _records([1.0, 2.5, 3.0], key), rtol=1e-3)
        assert code == DIVERGED and verdict.startswith(f"diverged at step 2: original {key}"), verdict
    assert compare_records(_records([1.0, 2.0]), _records([1.0]), rtol=1e-3)[1] == DIVERGED
    verdict, code = compare_records(_records([2.0, 1.5]), _records([2.0, float("nan")]), rtol=1e-3)
    assert code == DIVERGED and verdict.startswith("diverged at step 2")
    no_val = [{k: v for k, v in r.items() if k != "val_loss"} for r in _records([1.0])]
    assert "val_loss is in only one" in compare_records(_records([1.0], "val_loss"), no_val, rtol=1e-3)[0]
    assert compare_records(_records([1.0, 2.0]), _records([9.0, 2.0]), rtol=1e-3, after_step=1)[1] == IDENTICAL
