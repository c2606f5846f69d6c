"""Streaming preparation: bounded memory, the cached run reads no document, the bounded tokenizer sample, the
incremental cache matching the in-memory tokenization, and bad data (one line naming file and line, exit 2,
nothing cached half-way)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import compose, run_cli
from effitrain.data import DataError
from effitrain.data.corpus import fingerprint, load_documents, split
from effitrain.data.prepare import prepare_data
from effitrain.data.tokens import EOS, load_tokenizer


def _cfg(paths, cache, *extra):
    return compose(["data=text", f"data.paths=[{','.join(map(str, paths))}]", f"data.cache_dir={cache}",
                    "data.vocab_size=300", *extra]).data


def test_streamed_cache_equals_tokenizing_each_document(corpus, tmp_path):
    data = prepare_data(_cfg([corpus], tmp_path))
    docs = load_documents(_cfg([corpus], tmp_path))
    tok = load_tokenizer(data.tokens.directory)
    eos = tok.token_to_id(EOS)
    train, val = split(docs, 0.05)
    expect = [i for d in train for i in [*tok.encode(d.text).ids, eos]]
    assert np.array_equal(np.asarray(data.tokens.train), np.asarray(expect, dtype=np.uint16))
    assert len(data.tokens.val) == sum(len(tok.encode(d.text).ids) + 1 for d in val)
    assert data.fingerprint == fingerprint(docs) and data.num_documents == len(docs)
    assert data.tokens.meta["train_bytes"] == sum(len(d.text.encode()) for d in train)


def test_cached_run_reads_no_document_and_a_touched_file_keeps_its_cache(corpus, tmp_path, monkeypatch):
    import shutil

    from effitrain.data import corpus as corpus_module

    work = shutil.copytree(corpus, tmp_path / "corpus")
    first = prepare_data(_cfg([work], tmp_path / "cache"))

    def no_reading(file):
        raise AssertionError(f"the cached run read {file.path}")

    monkeypatch.setattr(corpus_module, "_read_text", no_reading)
    assert prepare_data(_cfg([work], tmp_path / "cache")).tokens.directory == first.tokens.directory
    monkeypatch.undo()
    one = sorted(work.iterdir())[0]
    os.utime(one, ns=(one.stat().st_atime_ns, one.stat().st_mtime_ns + 10**9))  # same content, new mtime
    assert prepare_data(_cfg([work], tmp_path / "cache")).tokens.directory == first.tokens.directory
    one.write_text(one.read_text() + "\n# changed\n")
    changed = prepare_data(_cfg([work], tmp_path / "cache"))
    assert changed.tokens.directory != first.tokens.directory and changed.fingerprint != first.fingerprint


def test_tokenizer_trains_on_a_bounded_sample(corpus, tmp_path):
    whole = prepare_data(_cfg([corpus], tmp_path)).tokens.meta
    sampled = prepare_data(_cfg([corpus], tmp_path, "data.tokenizer_sample_mb=0.05")).tokens.meta
    biggest = max(f.stat().st_size for f in corpus.iterdir())
    assert 0 < sampled["tokenizer_sample_bytes"] <= 50_000 + biggest
    assert whole["tokenizer_sample_bytes"] == whole["train_bytes"]  # a budget above the corpus: all training text
    assert sampled["fingerprint"] == whole["fingerprint"]


_PEAK = r"""
import resource, sys
import effitrain.data.tokens as tokens
tokens._CHUNK_BYTES = 1 << 18
from conftest import compose
from effitrain.data.prepare import prepare_data
cfg = compose(["data=text", f"data.paths=[{sys.argv[1]}]", f"data.cache_dir={sys.argv[2]}", "data.vocab_size=300",
               "data.tokenizer_sample_mb=0.5"]).data
data = prepare_data(cfg)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, len(data.tokens.train))
"""


def _generated(root, megabytes: int):
    words = [f"w{i:x}" for i in range(4000)]
    rng = np.random.default_rng(0)
    for k in range(megabytes * 4):  # 256 KB files of Zipf-distributed words
        idx = np.minimum(rng.zipf(1.3, size=50_000), len(words)) - 1
        (root / f"f{k:04d}.txt").write_text(" ".join(words[i] for i in idx)[:262_144])
    return root


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS of preparing 3 MB and 15 MB: five times the text, about the same memory (256 KB chunks). Holding the
    corpus in memory (its text and its ids as int64, as the pipeline did before streaming) would add over 60 MB."""
    from conftest import REPO

    peaks = {}
    for mb in (3, 15):
        (tmp_path / f"c{mb}").mkdir()
        root = _generated(tmp_path / f"c{mb}", mb)
        out = subprocess.run([sys.executable, "-c", _PEAK, str(root), str(tmp_path / f"cache{mb}")], check=True,
                             capture_output=True, text=True, cwd=REPO / "tests",
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])))
        rss, tokens = map(int, out.stdout.split())
        peaks[mb] = rss
        assert tokens > mb * 100_000
    assert peaks[15] - peaks[3] < 20, peaks


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("bad, message", [
    ('{"text": "fine", ', r"bad\.jsonl:3: not valid JSON"),
    ('{"body": "no text key"}', r"bad\.jsonl:3: no key 'text'"),
])
def test_a_bad_jsonl_line_mid_file_names_file_and_line_and_caches_nothing(tmp_path, bad, message):
    path = _jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "good " * 50})] * 2 + [bad] +
                  [json.dumps({"text": "later " * 50})] * 2)
    cache = tmp_path / "cache"
    cfg = compose(["data=jsonl", f"data.paths=[{path}]", f"data.cache_dir={cache}", "data.vocab_size=300",
                   "data.tokenizer_sample_mb=0.0001"]).data  # the sample stops before the bad line: the encode finds it
    with pytest.raises(DataError, match=message):
        prepare_data(cfg)
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_invalid_utf8_in_jsonl_names_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps({"text": "ok " * 30}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    cfg = compose(["data=jsonl", f"data.paths=[{path}]", f"data.cache_dir={tmp_path / 'c'}", "data.vocab_size=300"])
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8"):
        prepare_data(cfg.data)


def test_an_unreadable_file_is_one_line_naming_it(corpus, tmp_path, monkeypatch):
    from pathlib import Path

    victim = sorted(corpus.iterdir())[5]
    read_text = Path.read_text

    def failing(self, *a, **k):
        if self == victim:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", failing)
    with pytest.raises(DataError, match=rf"{victim.name}: cannot read \(Permission denied\)"):
        prepare_data(_cfg([corpus], tmp_path / "cache"))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_bad_data_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    path = _jsonl(tmp_path / "mid.jsonl", [json.dumps({"text": "x " * 40})] * 3 + ["not json"])
    cache = tmp_path / "cache"
    proc = run_cli("train", "data=jsonl", f"data.paths=[{path}]", f"data.cache_dir={cache}", "data.vocab_size=300",
                   "max_steps=1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"effitrain: error: {path}:4: not valid JSON (Expecting value)"]
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_the_same_files_read_by_another_source_or_field_are_another_corpus(tmp_path):
    """The listing names the reader: data=text on a .jsonl file (one document), then data=jsonl (a document per
    line), then another data.field, each read anew rather than handed the cache the first built."""
    path = _jsonl(tmp_path / "docs.jsonl", [json.dumps({"text": f"text number {i} " * 20, "title": f"title {i} " * 20})
                                            for i in range(30)])
    seen = []
    for source, field in (("text", None), ("jsonl", "text"), ("jsonl", "title")):
        extra = [f"data.field={field}"] if field else []
        data = prepare_data(compose([f"data={source}", f"data.paths=[{path}]", f"data.cache_dir={tmp_path / 'c'}",
                                     "data.vocab_size=300", *extra]).data)
        seen.append((data.num_documents, data.fingerprint))
    assert [n for n, _ in seen] == [1, 30, 30] and len({f for _, f in seen}) == 3


def test_the_file_listing_is_rglobs_in_path_order(tmp_path):
    """The scandir listing a cached run builds finds what `rglob` + `is_file` + suffix found, in Path order (by parts:
    `a/x.py` before `a-b/x.py`, which string order would swap), without entering symlinked directories."""
    from effitrain.data import TEXT_SUFFIXES, _files_under

    root = tmp_path / "corpus"
    for name in ("a/x.py", "a-b/x.py", "a/b/c.md", "z.txt", "a/notes.rst", "a/data.bin", "B/up.py", "a/.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "a" / "dir.py").mkdir()  # a directory with a text suffix is not a file
    os.symlink(root / "a", root / "linked")  # rglob does not enter it either
    os.mkfifo(root / "pipe.txt")  # not a regular file
    expected = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    assert _files_under(root, TEXT_SUFFIXES) == expected
    names = [p.relative_to(root).as_posix() for p in expected]
    assert names.index("a/x.py") < names.index("a-b/x.py") and "linked/x.py" not in names and "a/.py" not in names


_AWKWARD = ["it's they'll I'd 3.14159 x=1;y+=2\r\n\ttab", "  leading spaces\n\n\n    trailing   ",
            "émigré 中文 🙂 naïve", "a literal <|endoftext|> inside", "", "\x00\x01 control", "ends in spaces   "]


def test_the_fast_encoder_gives_tokenizers_ids_for_the_bpe_effitrain_trains(tmp_path):
    """data/encode.py encodes with tiktoken only because its ids equal tokenizers' own: checked on ~4 MB of the
    stdlib with a BPE of the default vocabulary trained as every run trains it, plus awkward strings."""
    from effitrain.data.corpus import build_corpus
    from effitrain.data.encode import BulkEncoder
    from effitrain.data.tokens import train_bpe

    cfg = compose([f"data.cache_dir={tmp_path}", "data.tokenizer_sample_mb=2"]).data
    tok, _ = train_bpe([build_corpus(cfg)], cfg)
    texts = [d.text for d in load_documents(cfg)[::3]][:400] + _AWKWARD
    assert sum(map(len, texts)) > 3e6
    with BulkEncoder(tok) as encoder:
        assert encoder.tiktoken is not None
        fast = encoder.encode(texts)
    slow = tok.encode_batch_fast(texts)
    assert [ids.tolist() for ids in fast] == [e.ids for e in slow]


def test_other_tokenizers_keep_tokenizers_encoder(tmp_path):
    """A prefix space, a normalizer or another model would tokenize otherwise than tiktoken: tokenizers encodes."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    from effitrain.data.encode import BulkEncoder

    data = prepare_data(compose([f"data.cache_dir={tmp_path}", "data.vocab_size=300"]).data)
    spec = json.loads(load_tokenizer(data.tokens.directory).to_str())
    prefix = Tokenizer.from_str(json.dumps(spec))
    prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    lower = Tokenizer.from_str(json.dumps(spec))
    lower.normalizer = normalizers.Lowercase()
    for tok in (prefix, lower):
        with BulkEncoder(tok) as encoder:
            assert encoder.tiktoken is None
            expected = [e.ids for e in tok.encode_batch_fast(_AWKWARD)]
            assert [ids.tolist() for ids in encoder.encode(_AWKWARD)] == expected


def test_lone_surrogates_from_json_are_read_as_the_fingerprint_reads_them(tmp_path):
    """A JSON "\\ud800" escape makes a str that tokenizers refuses (a traceback before): it is tokenized as "?"."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one \\ud800 two"}\n' * 3)
    data = prepare_data(compose(["data=jsonl", f"data.paths=[{path}]", f"data.cache_dir={tmp_path / 'cache'}",
                                 "data.vocab_size=300"]).data)
    tok = load_tokenizer(data.tokens.directory)
    stream = [*np.asarray(data.tokens.train), *np.asarray(data.tokens.val)]
    assert tok.decode([int(i) for i in stream], skip_special_tokens=False).count("one ? two") == 3
