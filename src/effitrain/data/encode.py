"""Bulk encoding of a corpus into token ids: tiktoken's BPE when the tokenizer is the byte-level BPE this project
trains, tokenizers' own encode_batch_fast for any other.

Why: preparation is bound by the encoder. tiktoken applies the same vocabulary with the same GPT-2 pre-tokenizing
pattern about 5x faster (2 cores: 15.9 vs 3.0 MB/s, BENCHMARKS.md "Data preparation at scale"). It merges by the
rank of the merged token where tokenizers merges by the rank of the merge; for a BPE trained by tokenizers'
BpeTrainer a token's id is its first merge's rank, and the ids came out equal on all 11,896 documents (59.5M
tokens) of a 191 MB site-packages corpus and on the stdlib (tests/test_data_stream.py checks it on every run of
the suite). Anything built otherwise (a normalizer, a prefix space, another model) keeps tokenizers' encoder.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# tokenizers' ByteLevel pre-tokenizer pattern (use_regex=True), which tiktoken's gpt2 encoding also uses
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PLAIN_BPE = {"dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
              "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}


class BulkEncoder:
    """`encode(texts)` -> one uint32 id array per text, as `tok.encode_batch_fast` would give; a context manager
    (it holds a thread per core for tiktoken, which releases the GIL while it encodes)."""

    def __init__(self, tok):
        self.tok = tok
        self.tiktoken = _as_tiktoken(tok)
        self._pool = None

    def __enter__(self) -> BulkEncoder:
        if self.tiktoken is not None:
            self._pool = ThreadPoolExecutor(_cores())
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self._pool is None:
            return [np.asarray(e.ids, dtype=np.uint32) for e in self.tok.encode_batch_fast(texts)]
        return list(self._pool.map(self._encode_one, texts))

    def _encode_one(self, text: str) -> np.ndarray:
        return self.tiktoken.encode_to_numpy(text, allowed_special="all")  # special tokens in the text as tokenizers


def _as_tiktoken(tok):
    """tiktoken's Encoding with `tok`'s vocabulary when `tok` is a plain byte-level BPE (as train_bpe builds it:
    no normalizer, no post-processor, ByteLevel without a prefix space, special added tokens only), else None."""
    spec = json.loads(tok.to_str())
    model, pre = spec["model"], spec["pre_tokenizer"] or {}
    plain = (model.get("type") == "BPE" and all(model.get(k, v) == v for k, v in _PLAIN_BPE.items())
             and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
             and spec.get("normalizer") is None and spec.get("post_processor") is None
             and all(t["special"] and not (t["lstrip"] or t["rstrip"] or t["single_word"] or t["normalized"])
                     for t in spec["added_tokens"]))
    if not plain:
        return None
    import tiktoken

    to_byte = _byte_of_char()
    specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
    ranks = {bytes(to_byte[c] for c in token): i for token, i in model["vocab"].items() if token not in specials}
    return tiktoken.Encoding("effitrain-bpe", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode, the map ByteLevel writes every byte of a token through."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
