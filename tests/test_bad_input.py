"""Damaged or impossible input ends in one line on stderr and an exit code, never a traceback (issue 21, part 7):
exit 2 for bad input, 74 for an I/O failure (disk full). Most go through cli.main in this process; the worker case
and disk-full logging through the real `effitrain` command."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_in_process, compose, make_hf_model_dir, run_cli


def one_line(stderr: str) -> str:
    """The single line of stderr (fails when there are several, or a traceback)."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus, cache_dir):
    """A tiny local Hugging Face model directory (context 32 tokens) with the run's tokenizer.json."""
    from conftest import tiny_overrides

    return make_hf_model_dir(tiny_overrides(corpus, cache_dir), tmp_path_factory.mktemp("hf") / "model")


def damaged_copy(src: Path, dst: Path, name: str, *, keep: int | None = 100) -> Path:
    """A copy of directory `src` with `name` cut to its first `keep` bytes (None: removed)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != name:
            (dst / f.name).write_bytes(f.read_bytes())
        elif keep is not None:
            (dst / f.name).write_bytes(f.read_bytes()[:keep])
    return dst


def fake_run_dir(path: Path, overrides: list[str], tokenizer: bytes) -> Path:
    """A run directory as far as export/sample read it before the model: saved config, a complete-looking
    checkpoint, and the given tokenizer.json bytes."""
    from omegaconf import OmegaConf

    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose(overrides), path / ".hydra" / "config.yaml")
    step = path / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"step": 2}))
    (step / ".metadata").write_bytes(b"")
    (path / "tokenizer.json").write_bytes(tokenizer)
    return path


@pytest.mark.parametrize("verb", ["sample", "export", "train data.tokenizer="])
def test_damaged_tokenizer_json_is_one_line(verb, hf_dir, tiny, tmp_path, capsys):
    cut = (hf_dir / "tokenizer.json").read_bytes()[:300]
    if verb == "train data.tokenizer=":
        (tmp_path / "tok.json").write_bytes(cut)
        args = ["train", *tiny(f"data.tokenizer={tmp_path / 'tok.json'}", f"hydra.run.dir={tmp_path / 'run'}")]
        named = str(tmp_path / "tok.json")
    else:
        run = fake_run_dir(tmp_path / "run", tiny(), cut)
        args = [verb, str(run), *(["def "] if verb == "sample" else ["--out", str(tmp_path / "out")])]
        named = str(run / "tokenizer.json")
    code, stderr = cli_in_process(capsys, *args)
    line = one_line(stderr)
    assert code == 2 and named in line and "not a readable tokenizer.json" in line, line
    assert not (tmp_path / "out").exists() and (verb != "train data.tokenizer=" or not (tmp_path / "run").exists())


@pytest.mark.parametrize("damage, message", [("config.json", "config.json is damaged"),
                                             ("model.safetensors", "no weights file")])
@pytest.mark.parametrize("key", ["model.pretrained", "compression.distill.teacher"])
def test_a_damaged_pretrained_or_teacher_dir_is_one_line_before_any_run_dir(key, damage, message, hf_dir, tiny,
                                                                             tmp_path, capsys):
    bad = damaged_copy(hf_dir, tmp_path / "bad", damage, keep=100 if damage == "config.json" else None)
    extra = ["compression=distill", f"data.tokenizer={hf_dir / 'tokenizer.json'}"] if "distill" in key else []
    for verb in ("train", "estimate"):
        code, stderr = cli_in_process(capsys, verb, *tiny(*extra, f"{key}={bad}", f"hydra.run.dir={tmp_path / 'r'}"))
        line = one_line(stderr)
        assert code == 2 and f"{key}={bad}" in line and message in line, (verb, line)
    assert not (tmp_path / "r").exists()


def test_damaged_weights_of_an_hf_dir_are_one_line(hf_dir, tmp_path, capsys):
    """A weights file that exists but is cut short passes the checks; loading it is one ModelError line."""
    bad = damaged_copy(hf_dir, tmp_path / "bad", "model.safetensors", keep=3000)
    code, stderr = cli_in_process(capsys, "sample", str(bad), "def ")
    line = one_line(stderr)
    assert code == 2 and f"cannot load the model in {bad}" in line, line


def write_run(path: Path, tiny, *, steps: int = 3) -> Path:
    """A run directory as compare reads it: saved config, metrics.jsonl, summary.json."""
    from omegaconf import OmegaConf

    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose(tiny()), path / ".hydra" / "config.yaml")
    records = [{"step": s, "loss": 6.0 - s / 10, "tokens_per_s": 100.0, "step_time_s": 0.1}
               for s in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps({"final_val_loss": 5.5, "median_tokens_per_s": 100.0}))
    return path


def test_read_records_leaves_out_a_cut_last_line_with_a_warning(tiny, tmp_path, caplog):
    from effitrain.errors import UsageError
    from effitrain.runs import read_records

    run = write_run(tmp_path / "run", tiny)
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-20])  # a kill during the third line's write
    assert [r["step"] for r in read_records(run)] == [1, 2]
    assert [r.levelname for r in caplog.records if "cut short" in r.getMessage()] == ["WARNING"]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[2][:30], lines[1]]) + "\n")  # damage with a record after it
    with pytest.raises(UsageError, match="line 2 of 3 is damaged"):
        read_records(run)


@pytest.mark.parametrize("damage", ["metrics.jsonl", "summary.json"])
def test_compare_of_a_cut_metrics_line_or_a_broken_summary(damage, tiny, tmp_path, capsys, caplog):
    run = write_run(tmp_path / "run", tiny)
    (run / damage).write_bytes((run / damage).read_bytes()[:-20])
    code, stderr = cli_in_process(capsys, "compare", str(run), "--out", str(tmp_path / "cmp"))
    if damage == "metrics.jsonl":  # the steps before the cut are compared; the cut is said once
        assert code == 0, stderr
        assert sum("its last line is cut short" in r.getMessage() for r in caplog.records) == 1
    else:
        line = one_line(stderr)
        assert code == 2 and f"{run / 'summary.json'} is damaged" in line, line


@pytest.mark.parametrize("storage", ["garbage", "unopenable"])
def test_an_unusable_optuna_storage_is_one_line_and_leaves_no_sweep_dir(storage, tiny, tmp_path, capsys):
    db = tmp_path / "bad.db"
    db.write_bytes(os.urandom(4096))
    url = f"sqlite:///{db}" if storage == "garbage" else "sqlite:////proc/no-such-dir/optuna.db"
    code, stderr = cli_in_process(capsys, "train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
                                  "optimizer.lr=tag(log,interval(1e-4,1e-2))", *tiny(), f"hydra.sweeper.storage={url}",
                                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    line = one_line(stderr)
    assert code == 2 and f"the Optuna storage {url} cannot be used" in line, line
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("where", ["/proc/no-such-dir", "under a file"])
def test_a_cache_dir_that_cannot_hold_a_cache_is_one_line_before_any_run_dir(where, corpus, tmp_path, capsys):
    from conftest import tiny_overrides

    (tmp_path / "afile").write_text("x")
    cache = where if where.startswith("/") else str(tmp_path / "afile" / "cache")
    code, stderr = cli_in_process(capsys, "train", *tiny_overrides(corpus, Path(cache)),
                                  f"hydra.run.dir={tmp_path / 'run'}")
    line = one_line(stderr)
    assert code == 2 and f"data.cache_dir={cache}" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["hidden_size", "num_heads", "num_layers", "intermediate_size"])
@pytest.mark.parametrize("verb", ["estimate", "train"])
def test_model_sizes_must_be_positive(verb, key, tiny, tmp_path, capsys):
    code, stderr = cli_in_process(capsys, verb, *tiny(f"model.{key}=0"), f"hydra.run.dir={tmp_path / 'run'}")
    line = one_line(stderr)
    assert code == 2 and f"model.{key}=0 must be a positive integer" in line, line
    assert not (tmp_path / "run").exists()


def test_sample_tokens_beyond_the_context_are_refused(hf_dir, capsys):
    code, stderr = cli_in_process(capsys, "sample", str(hf_dir), "def ", "--tokens", "3000")
    line = one_line(stderr)
    assert code == 2 and "--tokens 3000" in line and "context of 32 tokens" in line, line
    code, stderr = cli_in_process(capsys, "sample", str(hf_dir), "x = 1\n" * 40)  # the prompt alone fills it
    assert code == 2 and "shorten the prompt" in one_line(stderr)


def test_sample_by_default_generates_what_fits_the_context(hf_dir):
    from effitrain.data import read_tokenizer
    from effitrain.engine.export import sample_text

    text = sample_text(hf_dir, "def ")  # the default 64 new tokens would not fit a 32-token context
    assert len(read_tokenizer(hf_dir / "tokenizer.json").encode(text).ids) <= 32


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_while_logging_is_an_io_failure():
    import logging

    from effitrain.errors import IOFailure
    from effitrain.logging import RunLogHandler
    from effitrain.logging.metrics import JsonlSink

    sink = JsonlSink(Path("/dev/full"))
    with pytest.raises(IOFailure, match="writing metrics: disk full at /dev/full") as caught:
        sink.write({"step": 1})
    assert caught.value.exit_code == 74
    sink.close()
    handler, logger = RunLogHandler("/dev/full"), logging.getLogger("effitrain.test_disk_full")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with pytest.raises(IOFailure, match="writing the log: disk full at /dev/full"):
            logger.warning("x" * 10000)  # past the buffer: the write reaches the device
        logger.warning("after the failure")  # writes nothing more, raises nothing more
    finally:
        logger.removeHandler(handler)
        handler.close()


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_run_whose_metrics_file_hits_a_size_limit_stops_in_one_line_with_whole_records(hf_dir, tiny, tmp_path):
    """Disk full through the real command: no file may grow past 12 kB (tokenizer.json, 9 kB, still fits), so
    metrics.jsonl (~540 bytes a step) fills up around step 20. Exit 74, one line naming the file; the run saved no
    checkpoint, so what it made is removed again (the records are whole until then: the /dev/full test above)."""
    run = tmp_path / "run"
    args = tiny("max_steps=200", "eval_every=1000", "checkpoint=off", f"hydra.run.dir={run}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "effitrain.cli", "train", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, preexec_fn=_file_size_limit(12_000))
    line = one_line(result.stderr)
    assert result.returncode == 74 and f"disk full at {run / 'metrics.jsonl'}" in line, line
    assert not run.exists()


def test_a_model_error_in_a_worker_is_the_single_process_line(hf_dir, tiny, tmp_path):
    """Weights cut short pass the checks (config.json parses, the file exists): the error is found only where the
    model loads, in the worker. Two ranks report it as one process does: the same line, exit 2."""
    bad = damaged_copy(hf_dir, tmp_path / "bad", "model.safetensors", keep=3000)
    lines = []
    for layout in ([], ["launcher.nproc_per_node=2", "parallel=ddp"]):
        result = run_cli("train", *tiny(f"model.pretrained={bad}", *layout), cwd=tmp_path)
        lines.append(one_line(result.stderr))
        assert result.returncode == 2, (layout, result.stderr[-3000:])
    assert lines[0] == lines[1] and f"model.pretrained={bad}: cannot load the model" in lines[0], lines
