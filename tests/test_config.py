"""Every option of every group composes against its schema and passes the pre-start checks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose, tiny_overrides
from effitrain.checks import check_all
from effitrain.compose import GROUP_NAMES, group_options
from effitrain.data import SFT_SOURCES

OPTIONS = [(group, option) for group in GROUP_NAMES for option in group_options(group)]
# Options that only make sense beside others: the companions a user would set with them.
MULTI_RANK = ["launcher.nproc_per_node=4", "model.num_heads=4"]
COMPANIONS = {
    "parallel": MULTI_RANK,
    ("optimizer", "zero1"): ["parallel=ddp", *MULTI_RANK],
    ("parallel", "single"): [],
    # a pipeline stage per block at least (4 ranks x 1), and untied embeddings (first and last stage)
    ("parallel", "pp"): [*MULTI_RANK, "model.num_layers=4", "model.tie_embeddings=false"],
    ("parallel", "pp-fsdp"): [*MULTI_RANK, "model.tie_embeddings=false"],
    ("parallel", "pp-fsdp-tp"): [*MULTI_RANK, "model.tie_embeddings=false"],  # pp 2 x dp_shard 1 x tp 2
    ("precision", "fp8"): ["device=cuda"],  # on the CPU fp8 is refused before start (tested in test_precision)
    ("launcher", "multinode"): ["launcher.rdzv_endpoint=head-node:29500", "parallel=fsdp"],
    ("compression", "grad-fp16"): ["parallel=ddp", *MULTI_RANK],
    ("compression", "grad-powersgd"): ["parallel=ddp", *MULTI_RANK],
    ("compression", "prune-magnitude"): ["max_steps=90"],
    ("compression", "lora"): ["model.pretrained={hf}"],  # a directory with a config.json (not loaded here)
    ("compression", "distill"): ["compression.distill.teacher={hf}"],
    ("data", "mix"): ["data.sources.code={{option:text,weight:1,paths:[{corpus}]}}"],
    # fine-tuning data trains with the model's own tokenizer and chat template (own_tokenizer writes both to {hf})
    ("data", "chat"): ["model.pretrained={hf}", "data.paths=[{chats}]"],
    ("data", "instruct"): ["model.pretrained={hf}", "data.paths=[{pairs}]"],
    ("data", "chat-stdlib"): ["model.pretrained={hf}"],
}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_checks(group, option, corpus, jsonl_corpus, cache_dir, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # what the checks read: a config that parses,
    (tmp_path / "model.safetensors").write_bytes(b"")  # and a weights file (not loaded here)
    overrides = tiny_overrides(corpus, cache_dir)
    if group in ("data", "model"):  # keep the option's own values, not the tiny run's
        overrides = [o for o in overrides if not o.startswith(f"{group}.") and not o.startswith(f"{group}=")]
        if group == "data" and option not in ("stdlib", "mix", *SFT_SOURCES):
            overrides.append(f"data.paths=[{jsonl_corpus if option in ('jsonl', 'datasets') else corpus}]")
    if group == "data" and option in SFT_SOURCES:
        from test_own_tokenizer import own_tokenizer

        own_tokenizer(tmp_path, corpus)
        chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        (tmp_path / "chats.jsonl").write_text(json.dumps(chat) + "\n")
        (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    chosen = COMPANIONS.get((group, option), COMPANIONS.get(group, []))
    companions = [c.format(hf=tmp_path, corpus=corpus, chats=tmp_path / "chats.jsonl", pairs=tmp_path / "pairs.jsonl")
                  for c in chosen]
    cfg = compose([*overrides, f"{group}={option}", *companions])
    if group in cfg and "name" in cfg[group]:
        assert cfg[group].name == option
    check_all(cfg)


@pytest.mark.parametrize("option", group_options("model"))
def test_every_model_option_builds(option):
    """Each model builds from its transformers config (on the meta device: no memory, no download)."""
    from effitrain.base.flops import model_flops_per_token
    from effitrain.model.build import build_model, count_params

    cfg = compose([f"model={option}"])
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=4096, max_seq_len=cfg.data.seq_len)
    assert count_params(model) > 0
    assert model_flops_per_token(model, seq_len=128) > 6 * 0.5 * count_params(model)


def test_every_yaml_opens_with_a_comment():
    from effitrain.compose import config_dir

    for path in config_dir().rglob("*.yaml"):
        assert path.read_text().startswith("# "), f"{path} must open with a one-line comment: what it does, its cost"


def test_defaults():
    cfg = compose([])
    assert (cfg.model.name, cfg.data.name, cfg.precision.name, cfg.parallel.name, cfg.optimizer.name,
            cfg.schedule.name) == ("tiny", "stdlib", "fp32", "single", "adamw", "cosine")
