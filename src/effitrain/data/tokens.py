"""Tokenizer (BPE trained on the corpus, or a given tokenizer.json) and the memory-mapped token cache.

The cache lives under data.cache_dir in a directory keyed by the corpus fingerprint and tokenizer
settings; files are written to a temporary name and renamed, so a crash never leaves half a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effitrain.data.corpus import DataError, Document

EOS = "<|endoftext|>"
_CACHE_VERSION = 1  # bump when the tokenization or file layout changes
_ENCODE_CHUNK = 256  # documents per encode_batch call (progress granularity)


@dataclass(frozen=True)
class TokenCache:
    directory: Path
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray
    vocab_size: int


def cache_key(*, fingerprint: str, tokenizer: str | None, vocab_size: int, val_fraction: float) -> str:
    tok = _file_sha(Path(tokenizer).expanduser()) if tokenizer else f"bpe{vocab_size}"
    raw = json.dumps([_CACHE_VERSION, fingerprint, tok, val_fraction])
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def load_or_build(*, directory: Path, train_docs: list[Document], val_docs: list[Document],
                  tokenizer: str | None, vocab_size: int, val_fraction: float) -> TokenCache:
    """Open the token cache in `directory`, building it first if it is not complete."""
    if not (directory / "meta.json").exists():
        _build(directory, train_docs, val_docs, tokenizer, vocab_size, val_fraction)
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return TokenCache(directory=directory, vocab_size=meta["vocab_size"],
                      train=np.memmap(directory / "train.bin", dtype=dtype, mode="r"),
                      val=np.memmap(directory / "val.bin", dtype=dtype, mode="r"))


def load_tokenizer(directory: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def _build(directory: Path, train_docs, val_docs, tokenizer, vocab_size, val_fraction) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tok = _load_given(tokenizer) if tokenizer else _train_bpe(train_docs or val_docs, vocab_size)
    eos = tok.token_to_id(EOS)
    train = _encode(tok, train_docs, eos, "train")
    val = _encode(tok, val_docs, eos, "validation")
    if len(train) == 0 or len(val) == 0:  # too few documents to split by name: hold out the stream's tail
        stream = np.concatenate([train, val])
        cut = int(len(stream) * (1 - val_fraction))
        train, val = stream[:cut], stream[cut:]
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    _atomic_write(directory / "tokenizer.json", tok.to_str().encode())
    _atomic_write(directory / "train.bin", train.astype(dtype).tobytes())
    _atomic_write(directory / "val.bin", val.astype(dtype).tobytes())
    meta = {"vocab_size": tok.get_vocab_size(), "dtype": np.dtype(dtype).name, "eos_id": eos,
            "train_tokens": int(len(train)), "val_tokens": int(len(val))}
    _atomic_write(directory / "meta.json", json.dumps(meta, indent=2).encode())  # written last: marks completion


def _train_bpe(docs: list[Document], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with _progress(f"training BPE tokenizer (vocab {vocab_size})", total=None):
        tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return tok


def _load_given(path: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path).expanduser()))
    if tok.token_to_id(EOS) is None:
        tok.add_special_tokens([EOS])
    return tok


def _encode(tok, docs: list[Document], eos: int, label: str) -> np.ndarray:
    pieces: list[np.ndarray] = []
    with _progress(f"tokenizing {label} ({len(docs)} documents)", total=len(docs)) as advance:
        for start in range(0, len(docs), _ENCODE_CHUNK):
            chunk = docs[start:start + _ENCODE_CHUNK]
            for enc in tok.encode_batch([d.text for d in chunk]):
                pieces.append(np.asarray(enc.ids + [eos], dtype=np.int64))
            advance(len(chunk))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


class _progress:
    """A rich progress bar on the console (a spinner when the total is unknown)."""

    def __init__(self, description: str, total: int | None):
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._task = self._bar.add_task(description, total=total)

    def __enter__(self):
        self._bar.start()
        return lambda n: self._bar.advance(self._task, n)

    def __exit__(self, *exc):
        self._bar.stop()


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def _file_sha(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data.tokenizer: {path} is not a tokenizer.json file")
    return hashlib.sha256(path.read_bytes()).hexdigest()
