"""The command line: help, +group normalisation, and every bad-input case (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest

from conftest import compose, run_cli
from effitrain.compose import GROUP_NAMES, group_options, normalize


def test_help_lists_verbs_groups_and_options(tmp_path):
    out = run_cli("--help", cwd=tmp_path)
    assert out.returncode == 0
    for word in ("train", "reproduce", *GROUP_NAMES, *group_options("model")):
        assert word in out.stdout


def test_plus_group_selects_like_plain_group():
    assert normalize(["+precision=bf16", "+optimizer.foo=1", "-m", "+parallel=single,single"]) == \
        ["precision=bf16", "+optimizer.foo=1", "-m", "parallel=single,single"]
    assert compose(normalize(["+precision=bf16"])) == compose(["precision=bf16"])
    assert compose(["precision=bf16"]).precision.kind == "bf16"


def test_cfg_job_prints_composed_config(tmp_path):
    out = run_cli("train", "+precision=bf16", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "kind: bf16" in out.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def empty_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("empty") / "empty.txt"
    path.write_text("")
    return path


BAD_TRAIN = {
    "unknown option": (["precision=fp99"], "unknown precision option 'fp99'; choose one of:"),
    "unknown option with +": (["+model=huge"], "unknown model option 'huge'"),
    "unknown option in sweep": (["-m", "precision=fp32,fp99"], "unknown precision option 'fp99'"),
    "unknown key": (["optimizer.lrr=1e-3"], "unknown key 'optimizer.lrr'"),
    "unknown key added with +": (["+optimizer.foo=1"], "unknown key 'optimizer.foo'"),
    # keys another option of the group owns: read by nothing under this one, so unknown here
    "tp degree under fsdp": (["parallel=fsdp", "parallel.tp=2"], "unknown key 'parallel.tp'"),
    "replicas under fsdp": (["parallel=fsdp", "parallel.dp_replicate=2"], "unknown key 'parallel.dp_replicate'"),
    "kv heads for gpt2": (["model=gpt2-124m", "model.num_kv_heads=4"], "unknown key 'model.num_kv_heads'"),
    "rope for gpt2": (["model=gpt2-124m", "model.rope_theta=1e4"], "unknown key 'model.rope_theta'"),
    "betas for sgd": (["optimizer=sgd", "optimizer.betas=[0.9,0.9]"], "unknown key 'optimizer.betas'"),
    "node rank": (["launcher.node_rank=1"], "unknown key 'launcher.node_rank'"),
    "compression method": (["compression.method=powersgd"], "unknown key 'compression.method'"),
    "kind key overridden": (["schedule.kind=wsd"], "schedule.kind=wsd would run the schedule option 'cosine'"),
    "strategy key overridden": (["parallel.strategy=ddp"], "choose the option instead"),
    "reduce dtype outside fsdp": (["precision=bf16", "precision.reduce_dtype=bfloat16"],
                                  "precision.reduce_dtype=bfloat16 is the FSDP reduce-scatter dtype"),
    "unknown top-level key": (["maxsteps=5"], "unknown key 'maxsteps'"),
    "wrong type": (["optimizer.lr=fast"], "optimizer.lr: Value 'fast' of type 'str' could not be converted to Float"),
    "wrong type int": (["max_steps=1.5"], "max_steps: Value '1.5'"),
    "wrong type in sweep": (["-m", "optimizer.lr=1e-3,fast"], "optimizer.lr: Value 'fast'"),
    "bad value": (["max_steps=0"], "max_steps=0 must be a positive integer"),
    "text without paths": (["data=text"], "data=text needs data.paths"),
    "missing data path": (["data=text", "data.paths=[/no/such.txt]"], "data.paths: /no/such.txt does not exist"),
    "sweep without -m": (["optimizer.lr=1e-3,3e-3"], "is a sweep: add -m"),
    "override syntax": (["a=b=c"], "mismatched input"),
}


@pytest.mark.parametrize("args,expected", BAD_TRAIN.values(), ids=BAD_TRAIN.keys())
def test_bad_train_input_is_one_line_exit_2_nothing_written(tmp_path, args, expected):
    out = run_cli("train", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effitrain: error: "), out.stderr
    assert expected in lines[0]
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "outputs").exists()


def test_empty_data_path(tmp_path, empty_file):
    out = run_cli("train", "data=text", f"data.paths=[{empty_file}]", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == f"effitrain: error: data.paths: {empty_file} is empty"
    assert not (tmp_path / "outputs").exists()


def test_jsonl_without_field_fails_before_a_run_dir_remains(tmp_path, cache_dir):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"body": "hello"}) + "\n")
    out = run_cli("train", "data=jsonl", f"data.paths=[{data}]", f"data.cache_dir={cache_dir}",
                  "hydra.run.dir=outputs/run", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"effitrain: error: {data}:1: no key 'text' (set data.field to the key "
                                               "holding the text)"]
    assert not (tmp_path / "outputs" / "run").exists()


BAD_OTHER = {
    "unknown verb": (["frobnicate"], "unknown verb 'frobnicate'"),
    "reproduce without dir": (["reproduce"], "reproduce needs a run directory"),
    "reproduce missing dir": (["reproduce", "nowhere"], "nowhere is not a directory"),
    "reproduce dir without config": (["reproduce", "."], "has no saved config (.hydra/config.yaml)"),
    "reproduce bad rtol": (["reproduce", ".", "--rtol", "x"], "--rtol takes a number"),
}


@pytest.mark.parametrize("args,expected", BAD_OTHER.values(), ids=BAD_OTHER.keys())
def test_bad_verb_input_is_one_line_exit_2(tmp_path, args, expected):
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert not (tmp_path / "outputs").exists()
