"""Checkpoints through the real command: a run killed with SIGKILL (or preempted with a signal) and resumed gives the
losses, grad norms and lrs of an uninterrupted run bit for bit; a kill mid-save loses nothing; an fsdp(2) checkpoint
resumes at world size 1 and 3; a restarted worker group continues from its checkpoint; failures are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    assert_losses_close,
    cli_in_process,
    only_run_dir,
    read_metrics,
    run_cli,
    start_cli,
    tiny_overrides,
    wait_for,
)

STEPS = 16
COMPARED = ("step", "loss", "grad_norm", "lr", "loss_scale", "skipped_steps", "val_loss")
FP16 = ["precision=fp16", f"precision.init_scale={2.0**24!r}"]  # overflows at first: skipped steps carry over
LAYOUTS = {
    "single": [],
    "ddp-fp16": ["parallel=ddp", "launcher.nproc_per_node=2", *FP16],  # ddp(2) and the fp16 scaler in one run
    "fsdp": ["parallel=fsdp", "launcher.nproc_per_node=2"],
}


def _overrides(corpus, cache_dir, *extra) -> list[str]:
    return tiny_overrides(corpus, cache_dir, f"max_steps={STEPS}", "eval_every=8", "checkpoint.every=4",
                          "checkpoint.keep_last=0", *extra)


def _run_dir(cwd: Path) -> Path | None:
    dirs = [d for d in (cwd / "outputs").glob("*/*") if d.is_dir()]
    return dirs[0] if dirs else None


def _checkpoint(cwd: Path, step: int) -> bool:
    run_dir = _run_dir(cwd)
    return run_dir is not None and (run_dir / "checkpoints" / f"step-{step}" / "manifest.json").is_file()


def _compared(run_dir: Path) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in read_metrics(run_dir)]


def _killed_then_resumed(tmp_path: Path, overrides: list[str], *, resume_args: tuple = ()) -> tuple[Path, int]:
    """Start the run, SIGKILL its whole process group once step-8's checkpoint is complete (the kill lands a few
    steps later: wherever the run has got to), resume it; (run dir, steps the killed run had logged)."""
    cwd = tmp_path / "killed"
    cwd.mkdir()
    proc = start_cli(cwd, "train", *overrides)
    wait_for(lambda: _checkpoint(cwd, 8), proc, cwd)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = _run_dir(cwd)
    logged = len(read_metrics(run_dir))
    assert logged < STEPS, "the run finished before the kill: nothing was tested"
    result = run_cli("resume", str(run_dir), *resume_args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, logged


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    """layout -> the run directory of an uninterrupted run (made on first use)."""
    made = {}

    def get(layout: str) -> Path:
        if layout not in made:
            cwd = tmp_path_factory.mktemp(f"reference-{layout}")
            result = run_cli("train", *_overrides(corpus, cache_dir, *LAYOUTS[layout]), cwd=cwd)
            assert result.returncode == 0, result.stderr[-3000:]
            made[layout] = only_run_dir(cwd / "outputs")
        return made[layout]
    return get


# single-process SIGKILL + resume is also what the kill-during-save and the SIGTERM tests below do
@pytest.mark.parametrize("layout", [pytest.param("single", marks=pytest.mark.extended), "ddp-fp16", "fsdp"])
def test_sigkill_then_resume_is_bit_identical(layout, reference, corpus, cache_dir, tmp_path):
    run_dir, logged = _killed_then_resumed(tmp_path, _overrides(corpus, cache_dir, *LAYOUTS[layout]))
    assert _compared(run_dir) == _compared(reference(layout)), f"killed after {logged} logged steps"
    resumes = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert resumes[0]["from_step"] >= 8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_loss"] == read_metrics(reference(layout))[-1]["loss"]
    if "precision=fp16" in LAYOUTS[layout]:
        assert read_metrics(run_dir)[-1]["skipped_steps"] >= 1


def test_fsdp_checkpoint_resumes_at_world_size_1_and_3(reference, corpus, cache_dir, tmp_path):
    """DCP reshards: the fsdp(2) run's step-8 checkpoint continues on 1 and on 3 ranks. Each rank draws its own
    batches, so the global batch changes: the losses are close to the 2-rank run's, not identical."""
    original = reference("fsdp")
    whole = [r["loss"] for r in read_metrics(original)][8:]
    for world in (1, 3):
        copy = tmp_path / f"world{world}"
        _copy_run(original, copy, keep_step=8)
        result = run_cli("resume", str(copy), f"launcher.nproc_per_node={world}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        records = read_metrics(copy)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert_losses_close(whole, [r["loss"] for r in records][8:], steps=STEPS - 8, rtol=0.05,
                            what=f"fsdp(2) -> {world} rank(s)")


def _copy_run(original: Path, copy: Path, *, keep_step: int) -> None:
    """A copy of a run directory whose only checkpoint is step `keep_step` (as if it had stopped there)."""
    import shutil

    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("step-*"))
    shutil.copytree(original / "checkpoints" / f"step-{keep_step}", copy / "checkpoints" / f"step-{keep_step}")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(reference, corpus, cache_dir, tmp_path):
    """SIGKILL while step-12 is being written (its .tmp directory exists): step-8 stays complete, the partial
    directory is never loaded, and resume continues from step 8 to the same result as an uninterrupted run."""
    for attempt in range(5):  # the kill must land inside the save's window; a run that finished it is retried
        cwd = tmp_path / f"try{attempt}"
        cwd.mkdir()
        proc = start_cli(cwd, "train", *_overrides(corpus, cache_dir))
        def saving(cwd=cwd) -> bool:
            return _run_dir(cwd) is not None and (_run_dir(cwd) / "checkpoints" / "step-12.tmp").exists() \
                and not _checkpoint(cwd, 12)

        wait_for(saving, proc, cwd)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        run_dir = _run_dir(cwd)
        if not _checkpoint(cwd, 12):
            break
    else:
        pytest.fail("no kill landed inside a save in 5 tries")
    assert (run_dir / "checkpoints" / "step-12.tmp").exists() and _checkpoint(cwd, 8)
    result = run_cli("resume", str(run_dir), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "resumes.jsonl").read_text())["from_step"] == 8
    assert _compared(run_dir) == _compared(reference("single"))
    assert not (run_dir / "checkpoints" / "step-12.tmp").exists()  # written again, this time completely


def test_a_restarted_worker_group_resumes_from_its_checkpoint(reference, corpus, cache_dir, tmp_path):
    """launcher.max_restarts=1 and one ddp worker killed mid-run: the agent restarts both workers, which continue
    from the latest checkpoint -- every step exactly once, identical to the uninterrupted run."""
    proc = start_cli(tmp_path, "train", *_overrides(corpus, cache_dir, *LAYOUTS["ddp-fp16"]), "launcher.max_restarts=1")
    wait_for(lambda: _checkpoint(tmp_path, 8), proc, tmp_path)
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    run_dir = _run_dir(tmp_path)
    assert _compared(run_dir) == _compared(reference("ddp-fp16"))
    assert "resumed from" in (run_dir / "train.log").read_text()


def _workers(root: int) -> list[int]:
    """The training processes under `root`: its descendants with no children of their own, other than
    multiprocessing's resource tracker (the forkserver has the workers as children)."""
    from effitrain.launcher.launch import descendants

    tree = descendants(root)
    parents = {parent for _, parent, _ in tree}
    return [pid for pid, _, cmdline in tree if pid not in parents and b"resource_tracker" not in cmdline]


@pytest.mark.parametrize("sig,layout,extra", [
    pytest.param(signal.SIGUSR1, "single", ["checkpoint=async"], marks=pytest.mark.extended),  # the same path
    (signal.SIGTERM, "single", [])], ids=["usr1-async", "term"])
def test_a_preemption_signal_saves_and_exits_75(sig, layout, extra, reference, corpus, cache_dir, tmp_path):
    """SIGUSR1 or SIGTERM (SLURM's warnings) to the command: the step finishes, a checkpoint of exactly that step
    is saved, exit 75 with one line; `effitrain resume` then finishes the run bit for bit (the single-process run
    saves asynchronously: its earlier checkpoints were written in the background)."""
    proc = start_cli(tmp_path, "train", *_overrides(corpus, cache_dir, *LAYOUTS[layout], *extra))
    wait_for(lambda: _checkpoint(tmp_path, 4), proc, tmp_path)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=300) == 75
    run_dir = _run_dir(tmp_path)
    stopped = read_metrics(run_dir)[-1]["step"]
    assert _checkpoint(tmp_path, stopped) and stopped < STEPS
    stderr = (tmp_path / "stderr.txt").read_text()
    assert f"stopped by a signal after step {stopped}" in stderr and "Traceback" not in stderr
    assert json.loads((run_dir / "preempted.json").read_text())["step"] == stopped
    result = run_cli("resume", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _compared(run_dir) == _compared(reference(layout)) and not (run_dir / "preempted.json").exists()


def test_resume_raises_max_steps_and_refuses_what_it_cannot_do(reference, tmp_path, capsys):
    """A finished run continues with max_steps raised (metrics go on from the next step); resume refuses to swap an
    option, to change the model, an unknown key, and a run that is already complete."""
    run_dir = tmp_path / "run"
    _copy_run(reference("single"), run_dir, keep_step=STEPS)
    for args, message in [([], f"is complete at step {STEPS}"),
                          (["model=gpt2-124m"], "keeps its model option"),
                          (["model.hidden_size=64"], "the checkpoint's weights fix the model"),
                          (["max_stepz=40"], "unknown key 'max_stepz'")]:
        code, stderr = cli_in_process(capsys, "resume", str(run_dir), *args)  # the refusals come before any launch
        assert code == 2 and message in stderr and stderr.count("\n") == 1, (args, stderr)
    result = run_cli("resume", str(run_dir), f"max_steps={STEPS + 4}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 5))
    assert f"max_steps: {STEPS + 4}" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_disk_full_is_one_line_and_the_previous_checkpoint_stays(reference, tmp_path):
    """A file-size limit (what a full disk looks like to a writer: the write fails) while step-12 is saved: one line,
    exit 74 (an I/O failure, not bad input), no half-written step-12; the step-8 checkpoint resumes afterwards."""
    import resource

    run_dir = tmp_path / "run"
    _copy_run(reference("single"), run_dir, keep_step=8)
    shard = max(f.stat().st_size for f in (run_dir / "checkpoints" / "step-8").iterdir())

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (shard // 2, shard // 2))

    result = subprocess.run([sys.executable, "-m", "effitrain.cli", "resume", str(run_dir)], cwd=tmp_path,
                            capture_output=True, text=True, preexec_fn=limited, timeout=600)
    assert result.returncode == 74, result.stderr[-3000:]
    assert "checkpoint step-12 could not be written" in result.stderr and "disk full at" in result.stderr
    assert "File too large" in result.stderr
    assert "the previous checkpoint step-8 is intact" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-8"]
    result = run_cli("resume", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _compared(run_dir) == _compared(reference("single"))


def test_nan_policy_abort_stops_in_one_line_and_skip_goes_on(corpus, cache_dir, tmp_path, monkeypatch, capsys):
    """An lr of 1e30 blows the weights up after step 1, so every later gradient norm is non-finite: abort stops after
    nan_patience such steps (none applied) with one line, exit 1, the step-1 checkpoint kept; skip trains on and
    counts them. In-process (`cli.main`, the command's own code path; a single-process run needs no launch)."""
    from effitrain.cli import main

    base = tiny_overrides(corpus, cache_dir, "max_steps=8", "optimizer.lr=1e30", "schedule=constant",
                          "schedule.warmup_steps=0")
    (tmp_path / "abort").mkdir()
    monkeypatch.chdir(tmp_path / "abort")
    with pytest.raises(SystemExit) as stopped:  # the command's exit: sys.exit(1) inside the Hydra job
        main(["train", *base, "nan_patience=3", "checkpoint.every=1", "checkpoint.keep_last=0"])
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    assert "not finite for 3 consecutive steps (2-4; none was applied)" in stderr
    assert "Traceback" not in stderr
    run_dir = only_run_dir(tmp_path / "abort" / "outputs")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1"]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["skipped_steps"] == 3
    (tmp_path / "skip").mkdir()
    monkeypatch.chdir(tmp_path / "skip")
    assert main(["train", *base, "nan_policy=skip", "checkpoint=off"]) == 0, capsys.readouterr().err[-3000:]
    assert read_metrics(only_run_dir(tmp_path / "skip" / "outputs"))[-1]["skipped_steps"] == 7

