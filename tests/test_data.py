"""Data pipeline: corpus order and fingerprint, split, token cache, sampler sharding and resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import compose
from effitrain.data import JsonlData, StdlibData, TextData
from effitrain.data.corpus import DataError, Document, fingerprint, load_documents, split
from effitrain.data.loader import Prefetcher, Shard, TrainBatches, WindowSampler, validation_batches
from effitrain.data.prepare import prepare_data


def test_stdlib_corpus_is_real_deterministic_code_and_prose():
    docs = load_documents(StdlibData())
    again = load_documents(StdlibData())
    files = [d.name for d in docs if not d.name.startswith("pydoc_data.topics/")]
    assert [d.name for d in docs] == [d.name for d in again]
    assert files == sorted(files) and docs[len(files)].name.startswith("pydoc_data.topics/")
    assert fingerprint(docs) == fingerprint(again)
    assert any(d.name == "json/decoder.py" for d in docs)
    assert any(d.name.startswith("pydoc_data.topics/") for d in docs)
    assert sum(len(d.text) for d in docs) > 5_000_000


def test_fingerprint_changes_with_content():
    a = [Document("a", "hello"), Document("b", "world")]
    assert fingerprint(a) != fingerprint([Document("a", "hello"), Document("b", "world!")])
    assert fingerprint(a) != fingerprint(a[::-1])


def test_corpus_identity_does_not_depend_on_where_it_lies(corpus, tmp_path):
    import shutil

    moved = shutil.copytree(corpus, tmp_path / "elsewhere" / "corpus")
    here = load_documents(TextData(paths=[str(corpus)]))
    there = load_documents(TextData(paths=[str(moved)]))
    assert [d.name for d in here] == [d.name for d in there] and fingerprint(here) == fingerprint(there)
    assert split(here, 0.05) == split(there, 0.05)


def test_split_is_by_name_and_stable():
    docs = [Document(f"doc{i}", "x") for i in range(400)]
    train, val = split(docs, 0.1)
    assert 20 < len(val) < 60 and len(train) + len(val) == 400
    assert split(docs[::-1], 0.1)[1] == val[::-1]  # membership depends on the name, not the order


def test_text_pipeline_builds_cache_once(corpus, cache_dir):
    cfg = compose(["data=text", f"data.paths=[{corpus}]", f"data.cache_dir={cache_dir}", "data.vocab_size=512"]).data
    first = prepare_data(cfg)
    files = sorted(first.tokens.directory.iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = prepare_data(cfg)
    assert second.tokens.directory == first.tokens.directory
    again = sorted(second.tokens.directory.iterdir())
    assert [f.stat().st_mtime_ns for f in again] == mtimes, (files, again)  # reused, not rebuilt
    assert second.tokens.vocab_size == 512, second.tokens.vocab_size
    train, val = len(second.tokens.train), len(second.tokens.val)
    assert train > 10 * val > 0, (train, val)
    assert int(np.max(second.tokens.train)) < 512
    assert not [f for f in files if f.name.endswith(".tmp")]


def test_jsonl_reads_the_named_field(tmp_path, cache_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document number {i} " * 20}) for i in range(50)))
    docs = load_documents(JsonlData(paths=[str(path)], field="body"))
    assert len(docs) == 50 and docs[3].text.startswith("document number 3")
    with pytest.raises(DataError, match="no key 'text'"):
        load_documents(JsonlData(paths=[str(path)]))


def test_single_document_corpus_still_gets_a_validation_tail(tmp_path, cache_dir):
    path = tmp_path / "one.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    cfg = compose(["data=text", f"data.paths=[{path}]", f"data.cache_dir={cache_dir}", "data.vocab_size=300"]).data
    tokens = prepare_data(cfg).tokens
    assert len(tokens.val) > 0 and len(tokens.train) > len(tokens.val)


def _batches(tokens, *, batch, accum, rank, world):
    sampler = WindowSampler(tokens, seq_len=8, seed=3)
    return TrainBatches(sampler, batch_size=batch, grad_accum_steps=accum, shard=Shard(rank=rank, world=world))


def test_sampler_shards_are_disjoint_and_cover_the_global_batch():
    tokens = np.arange(10_000, dtype=np.uint16)
    whole = _batches(tokens, batch=8, accum=1, rank=0, world=1).get(step=5, micro_step=0)
    shards = [_batches(tokens, batch=4, accum=1, rank=r, world=2).get(step=5, micro_step=0) for r in range(2)]
    accum = [_batches(tokens, batch=4, accum=2, rank=0, world=1).get(step=5, micro_step=m) for m in range(2)]
    assert torch.equal(torch.cat(shards), whole) and torch.equal(torch.cat(accum), whole)
    assert not set(shards[0][:, 0].tolist()) & set(shards[1][:, 0].tolist())
    assert torch.equal(whole[:, 1:], whole[:, :-1] + 1)  # windows are contiguous token runs


def test_sampler_is_resumable_and_covers_an_epoch_without_repeats():
    tokens = np.arange(8 * 64 + 1, dtype=np.uint16)  # exactly 64 windows
    batches = _batches(tokens, batch=8, accum=1, rank=0, world=1)
    epoch = torch.cat([batches.get(s, 0) for s in range(8)])
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 512, 8))
    fresh = _batches(tokens, batch=8, accum=1, rank=0, world=1)
    assert torch.equal(fresh.get(6, 0), batches.get(6, 0))  # step 6 needs nothing of steps 0-5
    assert not torch.equal(batches.get(8, 0), batches.get(0, 0))  # next epoch is reshuffled


def test_validation_batches_are_fixed_and_split_across_ranks():
    tokens = np.arange(2_000, dtype=np.uint16)
    whole = validation_batches(tokens, seq_len=8, batch_size=4, num_batches=2, shard=Shard())
    parts = [validation_batches(tokens, seq_len=8, batch_size=4, num_batches=2, shard=Shard(r, 2)) for r in range(2)]
    assert sum(b.shape[0] for b in whole) == 8 and sum(b.shape[0] for p in parts for b in p) == 16
    assert torch.equal(whole[0], validation_batches(tokens, seq_len=8, batch_size=4, num_batches=2, shard=Shard())[0])


def test_small_validation_split_gives_every_rank_the_same_number_of_batches():
    tokens = np.arange(5 * 8 + 1, dtype=np.uint16)  # 5 windows for 2 ranks
    parts = [validation_batches(tokens, seq_len=8, batch_size=2, num_batches=4, shard=Shard(r, 2)) for r in range(2)]
    assert [len(p) for p in parts] == [1, 1] and [p[0].shape[0] for p in parts] == [2, 2]
    with pytest.raises(DataError, match="fewer than one per rank"):
        validation_batches(np.arange(9, dtype=np.uint16), seq_len=8, batch_size=2, num_batches=1, shard=Shard(0, 2))


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetcher_yields_in_order_and_reraises(depth):
    items = [torch.tensor([i]) for i in range(5)]
    fetch = Prefetcher(iter(items), depth=depth, pin=False)
    assert [int(fetch.next()) for _ in range(5)] == list(range(5))

    def broken():
        yield torch.tensor([0])
        raise RuntimeError("disk gone")

    fetch = Prefetcher(broken(), depth=depth, pin=False)
    fetch.next()
    with pytest.raises(RuntimeError, match="disk gone"):
        fetch.next()
