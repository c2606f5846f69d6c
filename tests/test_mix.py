"""data=mix: the sampler draws each source in proportion to its weight (a pure function of seed, step and rank),
val_loss/<source> per source, the realised mixture in env.json, one shared tokenizer with a cache per source, bad
mixes as one line (exit 2, nothing cached), and a mixed run resuming bit for bit from disk."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose, read_metrics, tiny_overrides
from effitrain.data.loader import Shard, TrainBatches, WindowSampler
from effitrain.data.mix import BLOCK, MixSampler, block_counts, prepare_run_data

SEQ = 8
WEIGHTS = {"a": 0.6, "b": 0.3, "c": 0.1}


def _samplers(seed: int = 3) -> MixSampler:
    """Three sources whose tokens tell them apart: source i holds ids i*10_000 .. i*10_000 + its size."""
    sizes = {"a": 4_001, "b": 801, "c": 2_001}  # 500, 100 and 250 windows: b and c run through several epochs
    samplers = {name: WindowSampler(np.arange(size, dtype=np.int64) + 10_000 * i, seq_len=SEQ, seed=seed + i)
                for i, (name, size) in enumerate(sizes.items())}
    return MixSampler(samplers, WEIGHTS, seed=seed)


def _source_of(windows: torch.Tensor) -> list[str]:
    return [list(WEIGHTS)[int(w[0]) // 10_000] for w in windows]


def test_the_realised_mixture_is_the_weights_within_one_window_per_block():
    """Tolerance: every whole block of BLOCK samples holds each source's largest-remainder count, so over whole
    blocks each share is its weight's within 1/BLOCK; counts() (what env.json reports) is what windows() draws."""
    sampler = _samplers()
    drawn = _source_of(sampler.windows(0, 3 * BLOCK))
    for name, weight in WEIGHTS.items():
        assert abs(drawn.count(name) / (3 * BLOCK) - weight) <= 1 / BLOCK, (name, drawn.count(name))
    assert block_counts(WEIGHTS) == {"a": 2458, "b": 1229, "c": 409} and sum(block_counts(WEIGHTS).values()) == BLOCK
    part = _source_of(sampler.windows(BLOCK - 300, 1_000))  # a range across a block boundary
    assert sampler.counts(BLOCK - 300, 1_000) == {name: part.count(name) for name in WEIGHTS}


def test_each_source_walks_its_own_windows_without_repeats_within_an_epoch():
    sampler = _samplers()
    b = [w for w in sampler.windows(0, 1_000) if int(w[0]) // 10_000 == 1][:100]  # b has exactly 100 windows
    assert sorted(int(w[0]) - 10_000 for w in b) == list(range(0, 800, SEQ))
    assert torch.equal(b[0][1:], b[0][:-1] + 1)  # windows are contiguous token runs of their own source


def test_the_mixed_batch_is_a_pure_function_of_seed_step_and_rank():
    def batches(rank: int, world: int, batch: int, seed: int = 3) -> TrainBatches:
        return TrainBatches(_samplers(seed), batch_size=batch, grad_accum_steps=1, shard=Shard(rank=rank, world=world))

    whole = batches(0, 1, 16).get(step=300, micro_step=0)  # step 300: inside the second block
    assert torch.equal(whole, batches(0, 1, 16).get(step=300, micro_step=0))  # a fresh sampler, no history
    shards = [batches(r, 2, 8).get(step=300, micro_step=0) for r in range(2)]
    assert torch.equal(torch.cat(shards), whole)  # ranks split the global batch, as with one source
    assert not set(shards[0][:, 0].tolist()) & set(shards[1][:, 0].tolist())
    assert not torch.equal(batches(0, 1, 16, seed=4).get(step=300, micro_step=0), whole)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """A second domain: 12 other stdlib modules as JSON lines ({"body": ...}), apart from conftest's corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": src.read_text(encoding="utf-8", errors="replace")}) + "\n"
                            for src in sorted(root.glob("*.py"))[60:72]))
    return path


def _mix(corpus, cache_dir, docs, *extra, code: float = 0.75, weight_docs: float = 0.25):
    base = [o for o in tiny_overrides(corpus, cache_dir, *extra) if not o.startswith(("data=", "data.paths"))]
    return ["data=mix", f"data.sources.code={{option:text,weight:{code},paths:[{corpus}]}}",
            f"data.sources.docs={{option:jsonl,weight:{weight_docs},paths:[{docs}],field:body}}", *base]


@pytest.fixture(scope="module")
def mixed(corpus, cache_dir, docs, tmp_path_factory):
    """A tiny mixed run of 4 steps (evaluated at 2 and 4): its config and run directory."""
    from effitrain.engine.train import run

    cfg = compose(_mix(corpus, cache_dir, docs, "max_steps=4", "eval_every=2", "checkpoint.every=0"))
    run_dir = tmp_path_factory.mktemp("mixed")
    run(cfg, run_dir)
    return cfg, run_dir


def test_a_mixed_run_reports_val_loss_per_source_and_its_mixture(mixed):
    _, run_dir = mixed
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["val_loss/code"] != r["val_loss/docs"]
        assert r["val_loss"] == pytest.approx(0.75 * r["val_loss/code"] + 0.25 * r["val_loss/docs"])
    mixture = json.loads((run_dir / "env.json").read_text())["mixture"]
    code, other = mixture["sources"]["code"], mixture["sources"]["docs"]
    assert mixture["samples"] == 4 * 4 and code["windows"] + other["windows"] == 16
    assert code["tokens"] == code["windows"] * 32 and code["target_share"] == 0.75
    assert code["train_tokens"] > 0 and other["val_tokens"] > 0 and code["fingerprint"] != other["fingerprint"]
    assert set(json.loads((run_dir / "data_report.json").read_text())["sources"]) == {"code", "docs"}


def test_one_tokenizer_for_all_sources_and_reweighting_re_tokenizes_nothing(corpus, cache_dir, docs, monkeypatch):
    first = prepare_run_data(compose(_mix(corpus, cache_dir, docs)).data)
    code, other = first.sources["code"].tokens, first.sources["docs"].tokens
    assert code.directory != other.directory  # a token cache per source
    assert (code.directory / "tokenizer.json").read_text() == (other.directory / "tokenizer.json").read_text()

    from effitrain.data import corpus as corpus_module

    def no_reading(*_):
        raise AssertionError("a reweighted mix read a document")

    monkeypatch.setattr(corpus_module, "_read_text", no_reading)
    monkeypatch.setattr(corpus_module, "_jsonl_documents", no_reading)
    again = prepare_run_data(compose(_mix(corpus, cache_dir, docs, code=0.1, weight_docs=0.9)).data)
    assert {n: d.tokens.directory for n, d in again.sources.items()} == \
        {n: d.tokens.directory for n, d in first.sources.items()}
    assert again.fingerprint != first.fingerprint  # the mixture is part of what the run trains on


def test_with_a_given_tokenizer_a_new_source_leaves_the_others_caches(corpus, cache_dir, docs, tmp_path):
    tokenizer = prepare_run_data(compose(_mix(corpus, cache_dir, docs)).data).tokenizer_dir / "tokenizer.json"
    one = [o for o in _mix(corpus, cache_dir, docs, f"data.tokenizer={tokenizer}") if "sources.docs" not in o]
    alone = prepare_run_data(compose(one).data).sources["code"].tokens.directory
    both = prepare_run_data(compose(_mix(corpus, cache_dir, docs, f"data.tokenizer={tokenizer}")).data)
    assert both.sources["code"].tokens.directory == alone


@pytest.mark.parametrize("override, message", [
    ("data.sources.docs.weight=-1", r"^data\.sources\.docs\.weight=-1 must be a finite number >= 0"),
    ("data.sources.docs.weight=abc", r"^data\.sources\.docs\.weight='abc' must be a finite number >= 0"),
    ("data.sources={x:{option:stdlib,weight:0}}", r"^data\.sources: the weights sum to 0"),
    ("data.sources.docs.option=parquet", r"^data\.sources\.docs\.option='parquet' is not one of: stdlib, text, "),
    ("data.sources={x:{option:stdlib,weight:1},x:{option:stdlib,weight:2}}",
     r"^data\.sources: the key 'x' appears twice in one value"),
    ("data.sources.code.field=body", r"^unknown key 'data\.sources\.code\.field': a text source has option, weight, "
                                     r"paths$"),
    ("data.sources.code.seq_len=64", r"seq_len is the whole mix's: set data\.seq_len$"),
    ("data.sources.code.paths=[/no/such/dir]", r"^data\.sources\.code: data\.paths: /no/such/dir does not exist$"),
])
def test_a_bad_mix_is_one_line_exit_2_and_caches_nothing(corpus, docs, tmp_path, capsys, override, message):
    import re

    from effitrain.cli import main

    cache = tmp_path / "cache"
    args = _mix(corpus, cache, docs)
    if override.startswith("data.sources="):  # a whole dict merges into the sources given: start from none
        args = [o for o in args if not o.startswith("data.sources.")]
    args.append(override)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("effitrain: error: "), err
    assert re.search(message, err[0].removeprefix("effitrain: error: ")), err[0]
    assert not cache.exists()


def test_a_mixed_run_resumes_bit_for_bit_from_disk(mixed, tmp_path):
    """Save after step 2 (DCP on disk), load into a fresh Trainer, train 3-4: the same losses, grad norms and
    per-source validation losses as 4 steps in one go (the mixed sampler needs only the step)."""
    from test_train import _train_through_disk

    cfg, whole = mixed
    first = _train_through_disk(cfg, tmp_path / "first", until=2)
    _train_through_disk(cfg, tmp_path / "second", until=4, checkpoint=first)
    keys = ("step", "loss", "grad_norm", "lr", "val_loss", "val_loss/code", "val_loss/docs")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "second")] == \
        [{k: r.get(k) for k in keys} for r in read_metrics(whole)][2:]


def test_a_bad_line_in_one_source_names_the_source_and_the_line(corpus, docs, tmp_path):
    from effitrain.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "fine " * 40}) + "\n" + '{"body": "cut' + "\n")
    overrides = [o.replace(str(docs), str(bad)) for o in _mix(corpus, tmp_path / "cache", docs)]
    with pytest.raises(DataError, match=rf"^data\.sources\.docs: {bad}:2: not valid JSON"):
        prepare_run_data(compose(overrides).data)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]  # no cache half-built


def test_eval_of_a_mix_reports_each_source_as_alone(mixed, corpus, cache_dir, docs, tmp_path):
    """`effitrain eval` on data=mix: val_loss/<source> is what evaluating that source alone gives, val_loss their
    weighted mean, and a val_bpb per source."""
    from effitrain.commands.evaluate import evaluate_model
    from effitrain.model.build import build_model, init_weights

    cfg, _ = mixed
    data = prepare_run_data(cfg.data)
    hf = tmp_path / "hf"
    model = build_model(cfg.model, vocab_size=data.vocab_size, max_seq_len=cfg.data.seq_len)
    init_weights(model, cfg=cfg.model, seed=3)
    model.save_pretrained(hf)
    tokenizer = data.tokenizer_dir / "tokenizer.json"
    own = [f"model.pretrained={hf}", f"data.tokenizer={tokenizer}", "device=cpu"]
    result = evaluate_model(compose([*_mix(corpus, cache_dir, docs), *own]))
    alone = evaluate_model(compose([*tiny_overrides(corpus, cache_dir), *own]))
    assert result["val_loss/code"] == pytest.approx(alone["val_loss"], rel=1e-6)
    assert result["val_loss"] == pytest.approx(0.75 * result["val_loss/code"] + 0.25 * result["val_loss/docs"])
    assert result["val_bpb/code"] == pytest.approx(alone["val_bpb"], rel=1e-6) and result["val_bpb/docs"] > 0
