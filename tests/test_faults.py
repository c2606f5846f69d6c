"""Faults a user meets, through the real command: a run directory that already holds the user's files, a failure
(bad input found late, Ctrl-C, a full disk, SIGKILL) -- the user's files survive every one, and a run deletes only
what it made; one writer per run directory; run files are never written through a symlink; Ctrl-C saves like
SIGTERM, twice stops at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import cli_in_process, make_hf_model_dir, read_metrics, run_cli, start_cli, tiny_overrides, wait_for

USER_FILES = {"thesis.tex": "\\section{Results}\n", "data/notes.md": "do not lose me\n"}


def _user_dir(path: Path) -> Path:
    for rel, text in USER_FILES.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def _intact(path: Path) -> bool:
    found = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    return found == set(USER_FILES) and all((path / rel).read_text() == text for rel, text in USER_FILES.items())


def _one_line(stderr: str) -> bool:
    return stderr.strip().count("\n") == 0 and "Traceback" not in stderr


def _overrides(corpus, cache_dir, *extra) -> list[str]:
    return tiny_overrides(corpus, cache_dir, "max_steps=8", "eval_every=4", "checkpoint.every=2",
                          "logging.every=1", *extra)


def _complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{step}" / "manifest.json").is_file()


def test_a_directory_holding_user_files_is_refused_before_anything_is_written(tiny, tmp_path, capsys, monkeypatch):
    """hydra.run.dir naming the user's directory, the working directory itself, or a file: one line, exit 2, and
    the directory exactly as it was (no .hydra/, no train.log)."""
    home = _user_dir(tmp_path / "thesis")
    (tmp_path / "a-file").write_text("keep")
    monkeypatch.chdir(home)
    for target, message in [(str(home), "already holds files effitrain did not write"),
                            (".", "already holds files effitrain did not write"),
                            (str(tmp_path / "a-file"), "is an existing file")]:
        code, stderr = cli_in_process(capsys, "train", *tiny(), f"hydra.run.dir={target}")
        assert code == 2 and message in stderr and _one_line(stderr), (target, stderr)
        assert _intact(home), sorted(home.rglob("*"))
    assert (tmp_path / "a-file").read_text() == "keep"


def test_a_failure_removes_only_what_this_run_made(corpus, cache_dir, tmp_path):
    """A late failure (model.pretrained's weights cut short: the checks pass, the load in the run fails) in a
    directory that existed empty: what the run wrote goes, the directory and its neighbours stay."""
    home = _user_dir(tmp_path / "home")
    run_dir = home / "run"
    run_dir.mkdir()
    model = make_hf_model_dir(tiny_overrides(corpus, cache_dir), tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    result = run_cli("train", *_overrides(corpus, cache_dir, f"model.pretrained={model}"),
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2 and _one_line(result.stderr), result.stderr[-3000:]
    assert "cannot load the model" in result.stderr
    assert run_dir.is_dir() and not any(run_dir.iterdir())  # it was empty before: empty again, not removed
    run_dir.rmdir()
    assert _intact(home)


def test_two_runs_in_one_directory_the_second_is_refused(corpus, cache_dir, tmp_path):
    """While a run writes its directory, `effitrain resume` of it is refused with the holder's pid and host; the
    first run's files stay valid (every metrics line parses)."""
    run_dir = tmp_path / "run"
    proc = start_cli(tmp_path, "train", *_overrides(corpus, cache_dir, "max_steps=400", "checkpoint.every=2"),
                  f"hydra.run.dir={run_dir}")
    wait_for(lambda: _complete(run_dir, 2), proc, tmp_path)
    second = run_cli("resume", str(run_dir), "max_steps=800", cwd=tmp_path)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) in (0, 75)
    assert still_running, "the first run ended before the second started: nothing was tested"
    assert second.returncode == 2 and f"is in use by pid {proc.pid}" in second.stderr, second.stderr[-2000:]
    assert _one_line(second.stderr)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, len(read_metrics(run_dir)) + 1))
    assert "resumes.jsonl" not in os.listdir(run_dir)  # the refused resume wrote nothing


def test_first_ctrl_c_saves_and_exits_75_then_resume_finishes(corpus, cache_dir, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) after a checkpoint: the step finishes, a
    checkpoint of it is saved, one line and exit 75; resume finishes the run with every step exactly once."""
    run_dir = tmp_path / "run"
    proc = start_cli(tmp_path, "train", *_overrides(corpus, cache_dir, "max_steps=4000", "checkpoint.every=2"),
                  f"hydra.run.dir={run_dir}")
    wait_for(lambda: _complete(run_dir, 2), proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 75, (tmp_path / "stderr.txt").read_text()[-3000:]
    stderr = (tmp_path / "stderr.txt").read_text()
    stopped = read_metrics(run_dir)[-1]["step"]
    assert f"stopped by a signal after step {stopped}" in stderr and "Traceback" not in stderr
    assert _complete(run_dir, stopped)
    result = run_cli("resume", str(run_dir), f"max_steps={stopped + 2}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stopped + 3))


def test_ctrl_c_before_the_first_step_removes_the_new_run_directory(corpus, cache_dir, tmp_path):
    """Ctrl-C while the run starts (nothing trained, nothing saved): exit 130, one line, no run directory left."""
    home = _user_dir(tmp_path / "home")
    run_dir = home / "run"
    proc = start_cli(tmp_path, "train", *_overrides(corpus, cache_dir), f"hydra.run.dir={run_dir}")
    wait_for(lambda: (run_dir / ".effitrain" / "run.json").is_file(), proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if run_dir.exists() else None
    assert left is None and _intact(home), (left, stderr[-3000:])


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_a_ctrl_c_while_claiming_waits_until_the_claim_is_known(tmp_path):
    """A Ctrl-C that arrives while the run directory is claimed acts only once the claim is registered (so the
    CLI's cleanup knows what to undo), even when the kernel hands it to another thread of the process."""
    from effitrain.rundir import _CLAIMS, _register, release_claims

    signal.signal(signal.SIGINT, signal.default_int_handler)
    idle = threading.Event()
    other = threading.Thread(target=idle.wait, daemon=True)  # a second thread that does not block SIGINT
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            from effitrain import rundir

            with rundir._signals_held(signal.SIGINT):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # an interrupt not held back would be raised here
                _register(tmp_path / "run", mode="new")
        assert list(_CLAIMS) == [os.path.realpath(tmp_path / "run")]
    finally:
        idle.set()
        release_claims(undo=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The loop's signal handling itself: one SIGINT asks for a stop after the step, a second raises Interrupted
    (exit code 130) at once."""
    from effitrain.engine.train import StopSignals
    from effitrain.errors import Interrupted

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (an xdist worker may ignore it)
    with pytest.raises(Interrupted, match="interrupted twice") as stopped:
        with StopSignals(tmp_path) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert stopped.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler is back


def _tmpfs(path: Path, size: str):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine cannot mount a small tmpfs (needs root)")
    return path


def test_a_full_disk_is_its_own_exit_code_and_keeps_the_last_checkpoint(corpus, cache_dir, tmp_path):
    """A 1.2 MB file system: step-2's checkpoint fits, step-4's does not. One line naming the disk as full, exit 74
    (not 2: this is no bad input), and the run directory stays, step-2 in it, resumable once there is space."""
    disk = _tmpfs(tmp_path / "disk", "1200k")
    try:
        run_dir = disk / "run"
        result = run_cli("train", *_overrides(corpus, cache_dir), f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 74, result.stderr[-3000:]
        assert "disk full at" in result.stderr and _one_line(result.stderr), result.stderr
        assert _complete(run_dir, 2) and not (run_dir / "checkpoints" / "step-4.tmp").exists()
        moved = tmp_path / "run"
        subprocess.run(["cp", "-a", str(run_dir), str(moved)], check=True)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    result = run_cli("resume", str(moved), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(moved)] == list(range(1, 9))


def test_run_files_are_never_written_through_a_symlink(corpus, cache_dir, tmp_path):
    """A received run directory with symlinks in it (train.log -> a file elsewhere, checkpoints/.write-test -> one
    too): resume refuses it in one line and no target changes; the writers themselves never follow a link either
    (a run file written whole replaces a link, an appended one refuses it)."""
    from effitrain.errors import UsageError
    from effitrain.files import open_append, write_file

    run_dir = tmp_path / "run"
    result = run_cli("train", *_overrides(corpus, cache_dir, "max_steps=4"), f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    targets = [tmp_path / "bashrc", tmp_path / "profile"]
    for target, link in zip(targets, [run_dir / "train.log", run_dir / "checkpoints" / ".write-test"], strict=True):
        target.write_text("precious\n")
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    result = run_cli("resume", str(run_dir), "max_steps=6", cwd=tmp_path)
    assert result.returncode == 2 and "is a symbolic link" in result.stderr and _one_line(result.stderr), \
        result.stderr[-3000:]
    assert all(t.read_text() == "precious\n" for t in targets)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    write_file(run_dir / "env.json", "{}")  # replaces a regular file as it would a link: never its target
    (run_dir / "summary.json").unlink()
    (run_dir / "summary.json").symlink_to(targets[1])
    write_file(run_dir / "summary.json", "{}")
    assert not (run_dir / "summary.json").is_symlink() and targets[1].read_text() == "precious\n"
    with pytest.raises(UsageError, match="is a symlink"):
        open_append(run_dir / "train.log")
    assert targets[0].read_text() == "precious\n"


def test_metrics_lines_are_whole(corpus, cache_dir, tmp_path):
    """metrics.jsonl is written one whole line per write: every line of a finished run parses."""
    run_dir = tmp_path / "run"
    result = run_cli("train", *_overrides(corpus, cache_dir, "max_steps=4"), f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_a_claim_undoes_only_its_own_and_only_once(tmp_path):
    """RunClaim's bookkeeping: a directory it made goes with its files; one that existed keeps what was there; a
    complete checkpoint elsewhere (checkpoint.dir) keeps everything; a settled claim is not undone a second time;
    two pinned default directories of the same second are two."""
    from effitrain.rundir import RunClaim, make_unused

    made = RunClaim(make_unused(tmp_path / "a"), made=True)
    (made.run_dir / "metrics.jsonl").write_text("{}\n")
    made.undo()
    assert not made.run_dir.exists()
    second = make_unused(tmp_path / "a")
    assert second == tmp_path / "a" and make_unused(tmp_path / "a") == tmp_path / "a-1"
    existing = _user_dir(tmp_path / "home") / "run"
    existing.mkdir()
    claim = RunClaim(existing)
    (existing / "train.log").write_text("x")
    claim.undo()
    assert existing.is_dir() and not any(existing.iterdir())
    existing.rmdir()
    assert _intact(tmp_path / "home")
    elsewhere = tmp_path / "ck"
    (elsewhere / "step-2").mkdir(parents=True)
    (elsewhere / "step-2" / ".metadata").write_bytes(b"")
    (elsewhere / "step-2" / "manifest.json").write_text("{}")
    kept = RunClaim(tmp_path / "b", checkpoints=elsewhere)
    (kept.run_dir / "train.log").write_text("x")
    kept.undo()
    assert (kept.run_dir / "train.log").is_file()
    kept.checkpoints = None
    kept.undo()  # settled: the second undo (the CLI's own cleanup after the task's) changes nothing
    assert (kept.run_dir / "train.log").is_file()


FAIL_RANK_1 = """# a bug that strikes rank 1 alone, at its 3rd optimizer step (tests/test_faults.py)
import os

import effitrain.engine.loop as loop

_real, _calls = loop.train_step, [0]


def train_step(*args, **kwargs):
    _calls[0] += 1
    if os.environ.get("RANK") == "1" and _calls[0] == 3:
        raise RuntimeError("injected: rank 1 fails alone")
    return _real(*args, **kwargs)


loop.train_step = train_step
"""


def test_a_rank_failing_alone_stops_the_job_at_once_with_its_own_error(corpus, cache_dir, tmp_path):
    """Rank 1 raises at its 3rd step while rank 0 waits for it in DDP's all-reduce: the failing rank aborts its
    process group rather than wait in the end-of-run barrier (where the job hung until gloo's 30-minute timeout),
    rank 0's collective fails on the closed connection, and the launcher names rank 1's error, not rank 0's lost
    peer. The bug is put in the workers by a sitecustomize.py on PYTHONPATH (every interpreter imports it)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_RANK_1)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)}
    start = time.monotonic()
    result = run_cli("train", *_overrides(corpus, cache_dir, "parallel=ddp", "launcher.nproc_per_node=2"),
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env, timeout=400)
    assert result.returncode == 1, result.stderr[-3000:]
    # "(pid N)" when the agent saw rank 1's exit itself, none when rank 0's lost peer led to rank 1's error file
    assert re.search(r"worker rank 1 (\(pid \d+\) )?failed, job stopped: RuntimeError: injected: rank 1 fails alone",
                     result.stderr), result.stderr[-3000:]
    print(f"a rank failing alone: the job ended {time.monotonic() - start:.0f} s after the command")
