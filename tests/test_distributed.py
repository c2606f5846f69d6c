"""Multi-process tests: 2 CPU ranks over gloo, started by the real `effitrain train` through the elastic agent.

Equivalence in fp32, 10 steps, same seed and same global batch; per-step loss within 1e-5 relative:
ddp(2) = single, fsdp(2) = ddp(2), fsdp-zero2(2) = fsdp(2), hsdp(2) = fsdp(2), tp(2) = fsdp-tp(2) = single, with and
without sequence parallel, for llama and gpt2; AC full = none, grad accumulation 2 x b = 1 x 2b, compile = eager (1e-4:
inductor fuses and reorders float ops). Dropout is 0 (the model group's default), so runs are deterministic.
Several layouts share one `-m` sweep: one parent process, each job launching its own workers. The default run
compares single, ddp, fsdp (AC none/full), tp+sp and ddp accumulation; `-m extended` adds gpt2, fsdp-zero2, hsdp,
every TP plan and fsdp accumulation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_losses_close, losses, only_run_dir, read_metrics, run_cli, tiny_overrides, train_ok

pytestmark = pytest.mark.slow
RTOL = 1e-5


@pytest.fixture(scope="module")
def base(corpus, cache_dir):
    """10 fp32 steps of the tiny model; warmup 2 so the lr moves from step 2 on."""
    return tiny_overrides(corpus, cache_dir, "max_steps=10", "eval_every=10", "schedule.warmup_steps=2")


def _assert_close(a: list[float], b: list[float], rtol: float = RTOL, what: str = "") -> None:
    assert_losses_close(a, b, steps=10, rtol=rtol, what=what)


def _sweep_jobs(tmp: Path) -> dict[str, Path]:
    """job directories of the one sweep under tmp, keyed by their overrides' model and parallel choices."""
    from omegaconf import OmegaConf

    jobs = {}
    for job in sorted((tmp / "outputs" / "multirun").glob("*/*/[0-9]*")):
        overrides = [o for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")
                     if o.startswith(("parallel", "model="))]
        jobs[" ".join(overrides)] = job
    return jobs


def _single_run(tmp_path_factory, name: str, *overrides: str) -> Path:
    cwd = tmp_path_factory.mktemp(name)
    train_ok(cwd, *overrides)
    return only_run_dir(cwd / "outputs")


def _data_parallel_sweep(tmp_path_factory, name: str, base: list[str], layouts: list[str]) -> dict[str, Path]:
    """One sweep of 2-rank layouts x AC none/full, global batch 4 = 2 per rank x 2 ranks: layout[+ac] -> run dir."""
    cwd = tmp_path_factory.mktemp(name)
    train_ok(cwd, "-m", *base, "batch_size=2", "launcher.nproc_per_node=2", f"parallel={','.join(layouts)}",
             "parallel.activation_checkpointing=none,full")
    jobs = _sweep_jobs(cwd)
    out = {}
    for layout in layouts:
        out[layout] = jobs[f"parallel={layout} parallel.activation_checkpointing=none"]
        out[f"{layout}+ac"] = jobs[f"parallel={layout} parallel.activation_checkpointing=full"]
    return out


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory) -> dict[str, Path]:
    """The runs the default tests compare, name -> run directory: single, ddp(2) and fsdp(2) each with and without
    full activation checkpointing, tp(2) with sequence parallel, ddp with gradient accumulation."""
    assert "model.dropout=" not in " ".join(base)  # 0 by default: the layouts must compute the same function
    out = {"single": _single_run(tmp_path_factory, "single", *base, "batch_size=4")}
    out |= _data_parallel_sweep(tmp_path_factory, "dp", base, ["ddp", "fsdp"])
    # one TP group of 2 ranks reads the whole batch of 4
    out["tp+sp"] = _single_run(tmp_path_factory, "tp", *base, "batch_size=4", "launcher.nproc_per_node=2",
                               "parallel=tp", "parallel.sequence_parallel=true")
    # 2 micro-steps of 1 per rank, gradient sync skipped on the first
    out["ddp-accum"] = _single_run(tmp_path_factory, "accum", *base, "batch_size=1", "grad_accum_steps=2",
                                   "launcher.nproc_per_node=2", "parallel=ddp")
    return out


@pytest.fixture(scope="module")
def more_runs(base, tmp_path_factory) -> dict[str, Path]:
    """The extended run's layouts: gpt2, fsdp-zero2 and hsdp (with and without AC), every TP plan with and
    without sequence parallel for llama and gpt2, fsdp with gradient accumulation."""
    out = {"gpt2": _single_run(tmp_path_factory, "gpt2", *base, "batch_size=4", "model=gpt2-124m")}
    out |= _data_parallel_sweep(tmp_path_factory, "more-dp", base, ["fsdp-zero2", "hsdp"])
    tp = tmp_path_factory.mktemp("more-tp")
    train_ok(tp, "-m", *base, "batch_size=4", "launcher.nproc_per_node=2", "model=tiny,gpt2-124m",
             "parallel=tp,fsdp-tp", "parallel.sequence_parallel=false,true")
    jobs = _sweep_jobs(tp)
    for model, name in (("tiny", ""), ("gpt2-124m", "gpt2 ")):
        for layout in ("tp", "fsdp-tp"):
            out[f"{name}{layout}"] = jobs[f"model={model} parallel={layout} parallel.sequence_parallel=False"]
            out[f"{name}{layout}+sp"] = jobs[f"model={model} parallel={layout} parallel.sequence_parallel=True"]
    out["fsdp-accum"] = _single_run(tmp_path_factory, "more-accum", *base, "batch_size=1", "grad_accum_steps=2",
                                    "launcher.nproc_per_node=2", "parallel=fsdp")
    return out


def test_ddp_matches_single(runs):
    _assert_close(losses(runs["single"]), losses(runs["ddp"]), what="ddp(2) vs single")


def test_fsdp_matches_ddp(runs):
    _assert_close(losses(runs["ddp"]), losses(runs["fsdp"]), what="fsdp(2) vs ddp(2)")


def test_tensor_and_sequence_parallel_match_single(runs):
    _assert_close(losses(runs["single"]), losses(runs["tp+sp"]), what="tp(2)+sp vs single")


def test_activation_checkpointing_matches_none(runs):
    for layout in ("ddp", "fsdp"):
        _assert_close(losses(runs[layout]), losses(runs[f"{layout}+ac"]), what=f"{layout} AC full vs none")


def test_grad_accumulation_matches_bigger_batch(runs):
    _assert_close(losses(runs["ddp"]), losses(runs["ddp-accum"]), what="ddp 2 x b=1 vs 1 x b=2")


@pytest.mark.extended
def test_fsdp_zero2_and_hsdp_match_fsdp_with_and_without_ac(runs, more_runs):
    for layout in ("fsdp-zero2", "hsdp"):
        _assert_close(losses(runs["fsdp"]), losses(more_runs[layout]), what=f"{layout}(2) vs fsdp(2)")
        _assert_close(losses(more_runs[layout]), losses(more_runs[f"{layout}+ac"]), what=f"{layout} AC full vs none")


@pytest.mark.extended
@pytest.mark.parametrize("family", ["", "gpt2 "], ids=["llama", "gpt2"])
def test_every_tensor_parallel_plan_matches_single(runs, more_runs, family):
    """TP plans: llama (q/k/v, gate/up column-wise) and gpt2 (Linear form: q/k/v, c_fc column-wise), each with and
    without sequence parallel (norms and residual stream on sequence shards)."""
    single = losses(more_runs["gpt2"] if family else runs["single"])
    for layout in ("tp", "fsdp-tp", "tp+sp", "fsdp-tp+sp"):
        _assert_close(single, losses(more_runs[family + layout]), what=f"{family}{layout}(2) vs single")


@pytest.mark.extended
def test_fsdp_grad_accumulation_matches_bigger_batch(runs, more_runs):
    _assert_close(losses(runs["fsdp"]), losses(more_runs["fsdp-accum"]), what="fsdp 2 x b=1 vs 1 x b=2")


@pytest.mark.extended  # reproduce itself is in the default run (tests/test_runs.py, tests/test_export.py)
def test_reproduce_relaunches_the_same_world(runs, tmp_path):
    """reproduce of a 2-rank fsdp sweep job: same launch shape, fp32 on CPU, so bit-for-bit."""
    result = run_cli("reproduce", str(runs["fsdp"]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "identical: 10 steps, loss, grad_norm, lr and val_loss bit-for-bit" in result.stdout
    [new_dir] = list((tmp_path / "outputs").glob("*/*_reproduce-*"))
    assert (new_dir / "rank_1.log").exists()  # it ran on two ranks again


def test_torchrun_from_outside_runs_the_same_worker(base, runs, tmp_path):
    """`torchrun -m effitrain.engine.train`: same losses as the launcher's fsdp run, in the directory hydra.run.dir
    names; the real launch shape is saved."""
    from omegaconf import OmegaConf

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "effitrain.engine.train", *base, "batch_size=2", "parallel=fsdp",
                             "hydra.run.dir=runs/${name}-fsdp"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs" / "run-fsdp"
    assert (run_dir / "metrics.jsonl").is_file() and not (tmp_path / "outputs").exists()
    saved_hydra = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml"))  # as given, unresolved
    assert saved_hydra["hydra"]["run"]["dir"] == "runs/${name}-fsdp"
    _assert_close(losses(runs["fsdp"]), losses(run_dir), what="torchrun fsdp(2) vs effitrain fsdp(2)")
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert (saved.launcher.nproc_per_node, saved.launcher.nnodes, saved.parallel.name) == (2, 1, "fsdp")
    assert (run_dir / "rank_1.log").exists()


def test_metrics_reduced_across_ranks(runs):
    """rank 0 writes; the global batch counts every data-parallel rank; each rank logged to its own file."""
    ddp, single = read_metrics(runs["ddp"]), read_metrics(runs["single"])
    assert len(ddp) == 10
    for r in ddp:
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2)
    assert "global batch 4 sequences" in (runs["ddp"] / "train.log").read_text()
    assert (runs["ddp"] / "rank_1.log").exists() and not (runs["single"] / "rank_1.log").exists()
    assert single[0]["loss"] == pytest.approx(ddp[0]["loss"], rel=RTOL)


@pytest.mark.extended
def test_compile_matches_eager(base, runs, tmp_path):
    """Regional compile (inductor on CPU) vs eager, alone and inside activation checkpointing (the block is
    compiled within the AC wrapper); looser tolerance: fused kernels reorder float ops."""
    train_ok(tmp_path, "-m", *base, "batch_size=4", "parallel.compile=true",
             "parallel.activation_checkpointing=none,full")
    for overrides, job in _sweep_jobs(tmp_path).items():
        _assert_close(losses(runs["single"]), losses(job), rtol=1e-4, what=f"compile vs eager ({overrides})")


@pytest.mark.extended
def test_design_card_fp16_fsdp_command(base, tmp_path):
    """The exact command of the design card, on CPU with the tiny model."""
    result = train_ok(tmp_path, *base, "+precision=fp16", "+parallel=fsdp", "launcher.nproc_per_node=2")
    run_dir = next((tmp_path / "outputs").glob("*/*"))
    records = read_metrics(run_dir)
    assert len(records) == 10 and all(r["loss_scale"] > 0 for r in records)
    assert "step 10/10" in result.stdout


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def test_killed_worker_ends_the_job(base, tmp_path):
    """SIGKILL rank 1 mid-run: the agent stops rank 0 and the command fails (rather than hanging), naming the rank."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "effitrain.cli", "train", *base, "max_steps=100000",
                             "launcher.nproc_per_node=2", "parallel=ddp"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not list(tmp_path.glob("outputs/*/*/metrics.jsonl")) and time.time() < deadline:
            time.sleep(0.5)
        # the elastic agent runs in the CLI process; on CPU the ranks are forked by its forkserver child
        workers = [w for child in _children(proc.pid) for w in _children(child)] or _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # started second: local rank 1
        stdout, stderr = proc.communicate(timeout=300)  # a hang guard, not a speed check
    finally:
        proc.kill()
    assert proc.returncode not in (0, None)
    # the agent may see rank 0's "connection reset by peer" before rank 1's SIGKILL: either names a rank
    assert "worker rank" in stderr and "job stopped" in stderr, stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["parallel=fsdp-tp", "launcher.nproc_per_node=3"], "parallel.tp=2 does not divide the world size 3"),
    (["parallel=hsdp", "parallel.dp_shard=2", "launcher.nproc_per_node=2"], "dp_replicate=2 x parallel.dp_shard=2"),
    (["parallel=ddp", "parallel.sequence_parallel=true", "launcher.nproc_per_node=2"],
     "unknown key 'parallel.sequence_parallel'"),
    (["parallel=fsdp", "parallel.sequence_parallel=true", "launcher.nproc_per_node=2"],
     "unknown key 'parallel.sequence_parallel'"),
    (["parallel=fsdp-tp", "parallel.tp=1", "parallel.sequence_parallel=true", "launcher.nproc_per_node=2"],
     "parallel.sequence_parallel=true needs a tensor-parallel degree > 1"),
    (["parallel=tp", "parallel.sequence_parallel=true", "data.seq_len=33", "launcher.nproc_per_node=2"],
     "splits data.seq_len=33 over parallel.tp=2 ranks"),
    (["parallel=ddp", "parallel.offload=cpu", "launcher.nproc_per_node=2"], "unknown key 'parallel.offload'"),
    (["parallel=single", "launcher.nproc_per_node=2"], "parallel=single runs one process"),
    (["device=cuda", "parallel=ddp", "launcher.nproc_per_node=2"], "GPU(s) are visible"),
])
def test_bad_layout_is_one_line_exit_2(tiny, tmp_path, args, message):
    if "device=cuda" in args:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
            pytest.skip("needs fewer than 2 visible GPUs")
    result = run_cli("train", *tiny(*args), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("effitrain: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert not list(tmp_path.glob("outputs/*/*"))
