"""The schema is the truth: YAML options, schemas and builders agree, and every key of every option's schema is read
by its builders -- a key nothing reads would be silently ignored, so it must not exist (it is an unknown key)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import compose, tiny_overrides
from effitrain.compose import GROUPS, TrainConfig, config_dir, group_options
from effitrain.data import SFT_SOURCES


def test_yamls_schemas_and_builders_agree():
    for group in GROUPS:
        kinds = set()
        for option in group_options(group.name):
            node = OmegaConf.load(config_dir() / group.name / f"{option}.yaml")
            kind = group.name if group.key is None else node[group.key]
            assert list(node.defaults) == [group.schema_name(kind), "_self_"], f"{group.name}/{option}.yaml"
            kinds.add(kind)
        assert kinds == set(group.schemas), f"{group.name}: YAML option kinds vs schemas"
        assert set(group.all_builders()) == set(group.schemas), f"{group.name}: builders vs schemas"


def test_every_option_declares_its_cost_and_traits():
    """Each option carries what the estimate counts of it and what the cross-group rule reads of it, where it is
    defined: a new option without them fails here, not on a CUDA box at its first fit check. A group whose options
    put nothing on the device and meet no other group's says why (Group.standalone)."""
    for group in GROUPS:
        if group.standalone:
            assert not group.all_costs() and not any(group.traits_of(k) for k in group.schemas), group.name
            continue
        assert set(group.all_costs()) == set(group.schemas), f"{group.name}: cost models vs schemas"
        untraited = [k for k in group.schemas if group.traits_of(k) is None]
        assert not untraited, f"{group.name}: options without declared traits: {untraited}"


def test_every_need_can_be_met():
    """A need no option of any group (nor the device) could ever provide would refuse its option always."""
    from effitrain.checks import _static_provides
    from effitrain.precision import CUDA

    # a value-dependent list counts with what it provides by default (its `static`: parallel's under parallel.ep=1)
    offered = {CUDA} | {t for g in GROUPS for k in g.schemas for t in _static_provides(g, k)}
    dynamic = {"tp_plan", "pretrained"}  # provided by the model's traits as a function of its node
    for group in GROUPS:
        for kind in group.schemas:
            traits = group.traits_of(kind)
            if traits is None or callable(traits.needs):
                continue
            for need in traits.needs:
                assert need.trait in offered | dynamic, f"{group.name}={kind} needs {need.trait!r}, offered by none"


def test_every_compression_cost_model_is_a_cost():
    """The estimate reads a compression method's cost model through compression.method.Cost's hooks."""
    from effitrain.compression import GROUP
    from effitrain.compression.method import Cost

    assert all(isinstance(c, Cost) for c in GROUP.all_costs().values())


@pytest.fixture
def reads(monkeypatch) -> set[str]:
    """Full keys ('optimizer.lr') of every config value read by attribute or item while the fixture is active."""
    seen: set[str] = set()
    get_attr, get_item = DictConfig.__getattr__, DictConfig.__getitem__

    def record(getter):
        def read(self, key):
            value = getter(self, key)
            if isinstance(key, str) and not key.startswith("_"):
                seen.add(self._get_full_key(key))
            return value
        return read

    monkeypatch.setattr(DictConfig, "__getattr__", record(get_attr))
    monkeypatch.setattr(DictConfig, "__getitem__", record(get_item))
    return seen


# Few runs that together select every option kind once (combined where they compose), with the settings under which
# the keys read only sometimes are read: the profiler's, TensorBoard, selective AC, warmup_ratio. One process each.
RUNS = [
    ["logging.profile=true", "logging.profile_start_step=1", "logging.profile_steps=1", "logging.tensorboard=true",
     "parallel.activation_checkpointing=selective", "schedule.warmup_ratio=0.5"],
    ["model=gpt2-124m", "data=jsonl", "precision=bf16", "parallel=ddp", "optimizer=adafactor", "schedule=constant"],
    ["data=stdlib", "precision=fp16", "parallel=fsdp", "optimizer=sgd", "schedule=linear"],
    ["parallel=hsdp", "parallel.dp_replicate=1", "schedule=wsd", "data=datasets"],
    ["parallel=tp", "schedule=inverse-sqrt", "checkpoint=async", "model.pretrained={hf}"],
    # a pretrained model under a sharding layout loads shard by shard (reads model.load_shards) as gpt2's option too
    ["parallel=fsdp-tp", "parallel.tp=1", "model=gpt2-124m", "model.pretrained={hf}"],
    ["optimizer=muon", "checkpoint=off", "compression=[prune-2of4,share-layers]"],
    ["optimizer=zero1", "parallel=ddp", "compression=[grad-fp16,qat-int8]"],
    ["precision=bf16-pure", "optimizer=adamw-8bit"],
    ["parallel=pp", "model.tie_embeddings=false"],  # one process: one stage
    ["parallel=pp-fsdp", "parallel.pp=1", "model.tie_embeddings=false"],
    ["parallel=pp-fsdp-tp", "parallel.pp=1", "parallel.tp=1", "model.tie_embeddings=false"],
    ["compression=[lora,grad-powersgd]", "model.pretrained={hf}", "parallel=ddp"],
    ["compression=[distill,qat-int4]", "compression.distill.teacher={hf}"],
    ["compression=[prune-magnitude,freeze]", "compression.prune_magnitude.end_step=2"],
    ["precision=fp8", "device=cpu"],  # refused on the CPU: its keys are read before the device check
    ["data=mix", "data.sources.a={{option:text,weight:1,paths:[{corpus}]}}",
     "data.sources.b={{option:jsonl,weight:1,paths:[{jsonl}],field:text}}"],
    # fine-tuning data: the {hf} model's tokenizer, given a chat template below
    ["data=chat", "model.pretrained={hf}", "data.paths=[{chats}]", "data.system_prompt=Be brief.", "data.seq_len=64"],
    ["data=instruct", "model.pretrained={hf}", "data.paths=[{pairs}]", "data.seq_len=64"],
    ["data=chat-stdlib", "model.pretrained={hf}", "data.seq_len=128"],
]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def _kind_key(group, cfg) -> str:
    return group.name if group.multi else f"{group.name}:{group.kind_of(cfg[group.name])}"


def test_every_schema_key_is_read(reads, corpus, jsonl_corpus, cache_dir, tmp_path):
    pytest.importorskip("torchao")
    from conftest import make_hf_model_dir
    from effitrain.engine.train import run
    from effitrain.errors import UsageError
    from effitrain.launcher.launch import launch_config

    hf = make_hf_model_dir(tiny_overrides(corpus, cache_dir), tmp_path / "hf")  # a pretrained model, a teacher
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    chats, pairs = tmp_path / "chats.jsonl", tmp_path / "pairs.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i} + 1?"},
                                                      {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                             for i in range(40)))
    pairs.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "completion": str(i + 1)}) + "\n" for i in range(40)))
    multi = {g.name for g in GROUPS if g.multi}
    read_by_kind: dict[str, set[str]] = {}
    for i, extra in enumerate(RUNS):
        extra = [e.format(hf=hf, corpus=corpus, jsonl=jsonl_corpus, chats=chats, pairs=pairs) for e in extra]
        base = tiny_overrides(corpus, cache_dir, "max_steps=2", "eval_every=2")
        if any(e in extra for e in ("data=stdlib", "data=mix", "data=chat", "data=instruct", "data=chat-stdlib")):
            base = [o for o in base if not o.startswith("data.paths")]  # the embedded corpus, sources, or given
        if any(e.startswith("data=") and e[5:] in SFT_SOURCES for e in extra):  # keys text data has and they not
            base = [o for o in base if not o.startswith(("data=", "data.vocab_size"))]
        data = [f"data.paths=[{jsonl_corpus}]"] if {"data=jsonl", "data=datasets"} & set(extra) else []
        cfg = compose([*base, *data, *extra])
        kinds = {group.name: _kind_key(group, cfg) for group in GROUPS}
        reads.clear()
        try:
            run(cfg, tmp_path / str(i))
        except UsageError:
            assert "precision=fp8" in extra
        for key in reads:
            group, _, field = key.partition(".")
            if group in multi:  # compression.<kind>.<field>: one label per chosen option
                kind, _, field = field.partition(".")
                read_by_kind.setdefault(f"{group}:{kind}", set()).add(field)
                continue
            read_by_kind.setdefault(kinds.get(group, "top"), set()).add(field if group in kinds else key)
    for launcher in ([], ["launcher=multinode", "launcher.rdzv_endpoint=head:29500"]):
        reads.clear()
        launch_config(compose(launcher).launcher, device="cpu")
        read_by_kind.setdefault("launcher:launcher", set()).update(k.partition(".")[2] for k in reads)

    unread = {}
    for group in GROUPS:
        for kind, schema in group.schemas.items():
            label = f"{group.name}:{kind}"
            assert label in read_by_kind, f"no run above selects {label}"
            missing = {f.name for f in dataclasses.fields(schema)} - read_by_kind[label]
            if missing:
                unread[label] = sorted(missing)
    top = {f.name for f in dataclasses.fields(TrainConfig)} - {g.name for g in GROUPS} - read_by_kind["top"]
    if top:
        unread["top level"] = sorted(top)
    assert not unread, f"schema keys no builder reads: {unread}"
