"""Checkpoints prove what they are: a flipped byte in any file of a checkpoint (shard, DCP metadata, manifest) is
found on load and named in one line; a resumed run falls back to its newest checkpoint that verifies and sets the
damaged one aside; rotation never deletes the last good checkpoint for a newer one that does not verify, nor
another run's; a run never resumes, overwrites or removes another run's checkpoint; and fuzzed manifests and DCP
metadata give a loaded checkpoint or the one-line error, nothing else (hypothesis)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli_in_process, read_metrics, run_cli, tiny_overrides
from effitrain.checkpoint.layout import (
    MANIFEST,
    MARKER,
    CheckpointError,
    CorruptCheckpoint,
    checksum_files,
    read_manifest,
    sealed,
    verify,
)
from effitrain.rundir import run_id

SHARD = "__0_0.distcp"
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def made(tmp_path_factory, corpus, cache_dir) -> Path:
    """A 4-step tiny run with checkpoints step-2 and step-4, trained by the command in this process."""
    from conftest import only_run_dir
    from effitrain.cli import main

    cwd = tmp_path_factory.mktemp("made")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(["train", *tiny_overrides(corpus, cache_dir, "max_steps=4", "eval_every=4", "eval_batches=1",
                                              "checkpoint.every=2", "checkpoint.keep_last=0")])
    finally:
        os.chdir(before)
    assert code == 0
    return only_run_dir(cwd / "outputs")


@pytest.fixture(scope="module")
def loader(made):
    """(a TrainState of the run's model, the World) to load its checkpoints into."""
    from tokenizers import Tokenizer

    from effitrain.engine.job import start_job
    from effitrain.engine.train import build_parts
    from effitrain.received import load_run_config

    cfg = load_run_config(made)
    cfg.device = "cpu"
    job = start_job(cfg)
    vocab = Tokenizer.from_file(str(made / "tokenizer.json")).get_vocab_size()
    return build_parts(cfg, job=job, vocab_size=vocab).state, job.world


def _copy(made: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(made, tmp_path / name))


def _flip(path: Path, at: int | None = None) -> None:
    """One byte changed in place, the size kept (what bit rot or a stray write looks like)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def _reseal(directory: Path, **changes) -> None:
    """Rewrite a checkpoint's manifest as a tool that knows the format would: its file list and checksum made to
    match the files as they now are (the checks left are the ones a consistent but hostile checkpoint meets)."""
    manifest = json.loads((directory / MANIFEST).read_text()) | changes
    manifest["files"] = checksum_files(directory, sync=False)
    (directory / MANIFEST).write_text(sealed(manifest))


def _one_line(error: Exception) -> str:
    text = str(error)
    assert text and "\n" not in text, text
    return text


@pytest.mark.parametrize("name", [".metadata", SHARD, MANIFEST])
def test_a_flipped_byte_in_any_checkpoint_file_is_caught_on_load(name, made, loader, tmp_path):
    from effitrain.checkpoint.store import load_checkpoint

    state, world = loader
    step = _copy(made, tmp_path) / "checkpoints" / "step-4"
    _flip(step / name)
    with pytest.raises(CorruptCheckpoint) as caught:
        load_checkpoint(state, step, world=world, what="resume")
    assert f"{step / name}" in _one_line(caught.value)


def test_every_single_byte_change_of_a_manifest_is_caught(made, tmp_path):
    """Each byte of manifest.json in turn: JSON that no longer parses, or contents that no longer match the
    manifest's own checksum -- never a manifest read as if nothing had happened."""
    original = (made / "checkpoints" / "step-4" / MANIFEST).read_bytes()
    for at in range(len(original)):
        changed = bytearray(original)
        changed[at] ^= 0x01
        (tmp_path / MANIFEST).write_bytes(bytes(changed))
        with pytest.raises(CorruptCheckpoint):
            read_manifest(tmp_path)


@pytest.mark.parametrize("damage", ["flipped", "missing"])
def test_resume_falls_back_to_the_newest_verified_checkpoint(damage, made, loader, tmp_path, caplog):
    """step-4 damaged (a changed byte in its shard, or its .metadata gone): the run resumes from step-2 with a
    warning naming the file, and step-4 is set aside as step-4.unverified (kept, not deleted)."""
    from effitrain.checkpoint.store import resume_latest

    state, world = loader
    run = _copy(made, tmp_path)
    root = run / "checkpoints"
    if damage == "flipped":
        _flip(root / "step-4" / SHARD)
        named = f"{root / 'step-4' / SHARD}: its xxh3_128 checksum differs"
    else:
        (root / "step-4" / ".metadata").unlink()
        named = f"{root / 'step-4' / '.metadata'} is missing"
    with caplog.at_level("WARNING", logger="effitrain"):
        path, manifest = resume_latest(state, root, run_id=run_id(run), world=world)
    assert path == root / "step-2" and manifest["step"] == 2 and state.step == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4.unverified"]
    assert named in caplog.text and "resuming from step-2" in caplog.text
    _flip(root / "step-2" / SHARD)  # and when nothing verifies: one line naming the file, nothing loaded
    with pytest.raises(CheckpointError, match="no earlier checkpoint of this run") as caught:
        resume_latest(state, root, run_id=run_id(run), world=world)
    assert SHARD in _one_line(caught.value)


def test_effitrain_resume_passes_over_a_damaged_checkpoint(made, tmp_path):
    """Through the command: step-4's shard changed, `effitrain resume` says so, continues from step-2 and saves
    step-4 anew beside the set-aside one."""
    run = _copy(made, tmp_path)
    root = run / "checkpoints"
    _flip(root / "step-4" / SHARD)
    result = run_cli("resume", str(run), "max_steps=6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = " ".join((result.stdout + result.stderr).split())  # the console wraps long lines
    assert f"{SHARD}: its xxh3_128 checksum differs" in said and "resuming from step-2" in said
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4", "step-4.unverified", "step-6"]
    verify(root / "step-4", read_manifest(root / "step-4"))
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))


def test_rotation_keeps_the_last_good_checkpoint_when_a_newer_one_fails_verification(made, tmp_path):
    """keep_last=1 with step-4 truncated: step-2 stays (step-4 does not count); another run's step-1 in the same
    directory is never deleted; once step-4 verifies, step-2 goes."""
    from effitrain.checkpoint.store import rotate

    run = _copy(made, tmp_path)
    root, rid = run / "checkpoints", run_id(run)
    shutil.copytree(root / "step-2", root / "step-1")
    _reseal(root / "step-1", run_id="another-run", step=1)
    whole = (root / "step-4" / SHARD).read_bytes()
    (root / "step-4" / SHARD).write_bytes(whole[:100])
    assert rotate(root, run_id=rid, keep_last=1) == []
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2", "step-4"]
    (root / "step-4" / SHARD).write_bytes(whole)
    assert rotate(root, run_id=rid, keep_last=1) == [root / "step-2"]
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-4"]


def test_resume_refuses_another_runs_checkpoint(made, loader, tmp_path, capsys):
    """A run directory whose checkpoints are another run's (a shared or copied checkpoint dir): resume refuses in one
    line, before anything launches; in the worker too; and a checkpoint from before run ids is refused likewise."""
    from effitrain.checkpoint.store import resume_latest

    state, world = loader
    run = _copy(made, tmp_path)
    root = run / "checkpoints"
    (run / ".effitrain" / "run.json").write_text(json.dumps({"run_id": "f" * 32}))
    code, stderr = cli_in_process(capsys, "resume", str(run), "max_steps=6")
    assert code == 2 and f"belongs to run {run_id(made)}" in stderr and stderr.count("\n") == 1, stderr
    assert "checkpoint.resume_from=" in stderr
    with pytest.raises(CheckpointError, match="belongs to run") as caught:
        resume_latest(state, root, run_id="f" * 32, world=world)
    _one_line(caught.value)
    _reseal(root / "step-4", run_id=None)
    with pytest.raises(CheckpointError, match="predates run ids"):
        resume_latest(state, root, run_id=run_id(made), world=world)


def test_a_save_never_keeps_or_removes_another_runs_checkpoint(made, loader, tmp_path):
    """Another run's step-N in the way of a save, or its step-N.tmp with data in it: one line, both left as they
    were. This run's own leftover .tmp (a kill mid-save) and an empty one are replaced; its own step-N is kept."""
    from effitrain.checkpoint.store import Checkpointer
    from effitrain.received import load_run_config

    state, world = loader
    run = _copy(made, tmp_path)
    root, rid = run / "checkpoints", run_id(run)
    cfg = load_run_config(run).checkpoint

    def checkpointer(owner: str) -> Checkpointer:
        return Checkpointer(cfg, root=root, world=world, manifest={"run_id": owner, "world_size": 1})

    before = (root / "step-2" / MANIFEST).read_bytes()
    state.step = 2
    with pytest.raises(CheckpointError, match="is in the way and is not this run's") as caught:
        checkpointer("another-run").save(state)
    _one_line(caught.value)
    checkpointer(rid).save(state)  # its own: the same state, kept
    assert (root / "step-2" / MANIFEST).read_bytes() == before
    tmp = root / "step-6.tmp"
    tmp.mkdir()
    (tmp / SHARD).write_bytes(b"half a shard")
    (tmp / MARKER).write_text("another-run")
    state.step = 6
    with pytest.raises(CheckpointError, match="was left by another run"):
        checkpointer(rid).save(state)
    assert (tmp / SHARD).read_bytes() == b"half a shard"
    (tmp / MARKER).write_text(rid)  # this run's own leftover: removed, the save completes
    checkpointer(rid).save(state)
    (root / "step-8.tmp").mkdir()  # empty (a kill before the marker): nothing to lose
    state.step = 8
    checkpointer(rid).save(state)
    for step in (6, 8):
        verify(root / f"step-{step}", read_manifest(root / f"step-{step}"))
        assert read_manifest(root / f"step-{step}")["run_id"] == rid
    assert not list(root.glob("*.tmp"))


# --- fuzz: every input is a loaded checkpoint or the one-line error ---------------------------------------------

_EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                            st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=4)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3),
                     max_leaves=6)


def _edited(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for op, at, value in edits:
        at = at % max(len(out), 1)
        if op == "flip" and out:
            out[at] ^= 1 << (value % 8)
        elif op == "set" and out:
            out[at] = value
        elif op == "insert":
            out[at:at] = bytes([value])
        elif op == "delete":
            del out[at:at + 1 + value % 16]
        elif op == "truncate":
            del out[at:]
    return bytes(out)


@pytest.fixture
def fuzzed(made, loader, tmp_path):
    """(the step directory to damage, restore(): its files as saved, check(): load it -- loaded or one line)."""
    from effitrain.checkpoint.store import load_checkpoint

    state, world = loader
    step = _copy(made, tmp_path) / "checkpoints" / "step-4"
    saved = {p.name: p.read_bytes() for p in step.iterdir()}

    def restore() -> None:
        for name, data in saved.items():
            (step / name).write_bytes(data)

    def check() -> None:
        try:
            load_checkpoint(state, step, world=world, what="resume")
        except CheckpointError as e:
            _one_line(e)
    return step, restore, check


@FUZZ
@given(edits=_EDITS)
def test_fuzz_manifest_bytes(fuzzed, edits):
    step, restore, check = fuzzed
    restore()
    (step / MANIFEST).write_bytes(_edited((step / MANIFEST).read_bytes(), edits))
    check()


@FUZZ
@given(where=st.sampled_from(["top", "entry", "name"]), key=st.integers(0, 100), value=_JSON,
       drop=st.booleans())
def test_fuzz_manifest_fields_sealed_again(fuzzed, where, key, value, drop):
    """A manifest whose checksum matches (a hand-made or hostile one): any field changed or dropped."""
    step, restore, check = fuzzed
    restore()
    manifest = {k: v for k, v in json.loads((step / MANIFEST).read_text()).items() if k != "checksum"}
    files = manifest["files"]
    if where == "top":
        name = sorted(manifest)[key % len(manifest)]
        manifest.pop(name) if drop else manifest.__setitem__(name, value)
    elif where == "entry":
        entry = files[sorted(files)[key % len(files)]]
        field = sorted(entry)[key % len(entry)]
        entry.pop(field) if drop else entry.__setitem__(field, value)
    else:
        name = sorted(files)[key % len(files)]
        files[str(value)] = files.pop(name)
    (step / MANIFEST).write_text(sealed(manifest))
    check()


@FUZZ
@given(edits=_EDITS)
def test_fuzz_dcp_metadata_sealed_again(fuzzed, edits):
    """DCP's .metadata changed and the manifest sealed to match: the allow-list unpickler and the load behind it
    meet every damaged pickle."""
    step, restore, check = fuzzed
    restore()
    (step / ".metadata").write_bytes(_edited((step / ".metadata").read_bytes(), edits))
    _reseal(step)
    check()
