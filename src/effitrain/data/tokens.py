"""Tokenizer (BPE trained on a bounded sample of the corpus, or a given tokenizer.json) and the token cache.

Building streams: a reader thread reads documents chunk by chunk while the previous chunk is encoded on every core
(data/encode.py), and the ids are appended to the train/val files as they come, so memory holds a few chunks,
never the corpus. It is built in a temporary directory renamed into place when complete, so a crash or a bad
line never leaves half a cache; the directory's name is keyed by the content fingerprint and the settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from effitrain.data import OWN_EOS, Specials, read_tokenizer, tokenizer_specials
from effitrain.data.clean import Cleaner
from effitrain.data.corpus import Corpus, DataError, Document, in_tokenizer_sample, is_validation
from effitrain.data.encode import BulkEncoder
from effitrain.data.progress import Progress

EOS = OWN_EOS  # the BPE effitrain trains separates documents with it; a given tokenizer with its own EOS
_CACHE_VERSION = 2  # bump when the tokenization or file layout changes
_CHUNK_BYTES = 1 << 20  # text per encode_batch call: dozens of documents for both cores; its encodings: ~50x this
_CHUNKS_AHEAD = 3  # chunks the reader may hold ready


@dataclass(frozen=True)
class TokenCache:
    directory: Path
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray
    vocab_size: int
    meta: dict


def settings_of(cfg) -> dict:
    """What the tokens depend on besides the corpus (the cache key's other half)."""
    tok = _file_sha(Path(cfg.tokenizer).expanduser()) if cfg.tokenizer else f"bpe{cfg.vocab_size}"
    if cfg.tokenizer:  # its content and what the files beside it make of it: two tokenizers never share a cache
        specials = tokenizer_specials(Path(cfg.tokenizer).expanduser(), what=f"data.tokenizer={cfg.tokenizer}")
        tok = [tok, specials.eos_id, specials.bos_id]
    clean = {key: cfg.clean[key] for key in ("exact_duplicates", "min_chars", "max_non_text", "max_line_chars",
                                             "max_repeated_lines")}
    if cfg.clean.near_dup_threshold is not None:  # only then: caches cleaned without it keep their keys
        clean |= {key: cfg.clean[key] for key in ("near_dup_threshold", "near_dup_num_perm", "near_dup_shingle_words")}
    return {"version": _CACHE_VERSION, "tokenizer": tok, "val_fraction": cfg.val_fraction,
            "tokenizer_sample_mb": cfg.tokenizer_sample_mb if not cfg.tokenizer else None,
            "clean": clean if cfg.clean.enabled else None}


def cache_key(*, fingerprint: str, settings: dict) -> str:
    raw = json.dumps([fingerprint, settings], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def open_cache(directory: Path) -> TokenCache | None:
    """The complete token cache in `directory`, memory-mapped; None when there is none."""
    if not (directory / "meta.json").exists():
        return None
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return TokenCache(directory=directory, vocab_size=meta["vocab_size"], meta=meta,
                      train=np.memmap(directory / "train.bin", dtype=dtype, mode="r"),
                      val=np.memmap(directory / "val.bin", dtype=dtype, mode="r"))


def build_cache(root: Path, corpus: Corpus, cfg, settings: dict) -> Path:
    """Tokenize `corpus` into a new cache under `root`; returns its directory (`root/<key>`), complete."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".build.{os.getpid()}.{threading.get_ident()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        started = time.perf_counter()
        tok, sample_bytes = (_load_given(cfg.tokenizer), 0) if cfg.tokenizer else train_bpe([corpus], cfg)
        specials = tokenizer_specials(Path(cfg.tokenizer).expanduser(), tok=tok) if cfg.tokenizer \
            else Specials(eos=EOS, eos_id=tok.token_to_id(EOS), bos_id=None, source="effitrain's own")
        cleaner = Cleaner(cfg.clean) if cfg.clean.enabled else None
        meta = _encode_corpus(tmp, tok, corpus, cfg.val_fraction, cleaner, specials=specials)
        report = cleaner.report() if cleaner else {"enabled": False, "documents": meta["documents"]}
        (tmp / "data_report.json").write_text(json.dumps(report, indent=2))
        meta |= {"tokenizer_sample_bytes": sample_bytes, "build_s": round(time.perf_counter() - started, 2)}
        (tmp / "tokenizer.json").write_text(tok.to_str())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks completion
        final = root / cache_key(fingerprint=meta["fingerprint"], settings=settings)
        try:
            os.rename(tmp, final)
        except OSError:  # built meanwhile by another process (or an identical corpus under other mtimes): keep it
            if open_cache(final) is None:
                raise
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(directory: Path):
    return read_tokenizer(directory / "tokenizer.json")


def train_bpe(corpora: list[Corpus], cfg):
    """A byte-level BPE trained on a deterministic sample of about data.tokenizer_sample_mb of training text, an equal
    share of it from each corpus (data=mix trains one for all its sources); (tokenizer, bytes sampled)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    budget = int(cfg.tokenizer_sample_mb * 1e6) // len(corpora)
    samples = [_Sample(corpus, budget=budget, val_fraction=cfg.val_fraction,
                       cleaner=Cleaner(cfg.clean) if cfg.clean.enabled else None) for corpus in corpora]
    with Progress("tokenizer sample", total_bytes=sum(min(budget, s.total) for s in samples)) as progress:
        tok.train_from_iterator((text for s in samples for text in s.texts(progress)), trainer=trainer)
    taken = sum(s.taken for s in samples)
    if taken == 0:
        raise DataError(f"data={cfg.name}: the corpus is empty{' after data.clean' if cfg.clean.enabled else ''}")
    return tok, taken


class _Sample:
    """Training documents whose name hashes below budget/corpus size, up to the budget; the first documents
    instead when that leaves none (a corpus of a few documents)."""

    def __init__(self, corpus: Corpus, *, budget: int, val_fraction: float, cleaner: Cleaner | None):
        self.corpus, self.budget, self.val_fraction, self.cleaner = corpus, budget, val_fraction, cleaner
        self.total = corpus.total_bytes()
        self.fraction = min(1.0, budget / max(self.total, 1))
        self.taken = 0

    def texts(self, progress) -> Iterator[str]:
        yield from self._take(self._candidates(), progress)
        if self.taken == 0:
            yield from self._take(self.corpus.documents(), progress)

    def _candidates(self) -> Iterator[Document]:
        def keep(d) -> bool:
            return not is_validation(d, self.val_fraction) and in_tokenizer_sample(d, self.fraction)

        if self.corpus.file_per_document:  # choose files by name before reading them
            return self.corpus.documents(f for f in self.corpus.files if keep(f))
        return (d for d in self.corpus.documents() if keep(d))

    def _take(self, docs: Iterator[Document], progress) -> Iterator[str]:
        for doc in docs:
            if self.taken >= self.budget:
                return
            if doc.text and not (self.cleaner and self.cleaner.reason(doc)):
                text, raw = _utf8(doc.text)
                self.taken += len(raw)
                progress.advance(documents=1, nbytes=len(raw))
                yield text


def _load_given(path: str):
    """A given tokenizer as it is: effitrain adds no token to a tokenizer it did not train."""
    return read_tokenizer(Path(path).expanduser(), what=f"data.tokenizer={path}")


def _encode_corpus(directory: Path, tok, corpus: Corpus, val_fraction: float, cleaner: Cleaner | None, *,
                   specials: Specials) -> dict:
    """Stream every document through the tokenizer into train.bin/val.bin (each document followed by the tokenizer's
    EOS, preceded by its BOS where it adds one), hashing names and texts on the way; the cache's meta."""
    eos = specials.eos_id
    start = [] if specials.bos_id is None else [np.asarray([specials.bos_id], dtype=np.uint32)]
    dtype = np.dtype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32)
    chunks: queue.Queue = queue.Queue(maxsize=_CHUNKS_AHEAD)
    reader = _Reader(corpus, chunks, val_fraction, cleaner)
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, bytes
    end = np.asarray([eos], dtype=np.uint32)
    with (directory / "train.bin").open("wb") as out_train, (directory / "val.bin").open("wb") as out_val, \
            Progress("tokenizing", total_bytes=corpus.total_bytes()) as progress, BulkEncoder(tok) as encoder:
        reader.start()
        try:
            while (chunk := chunks.get()) is not None:
                if isinstance(chunk, BaseException):
                    raise chunk
                encoded = encoder.encode([item.text for item in chunk])
                for part, out in (("train", out_train), ("val", out_val)):
                    mine = [(item, ids) for item, ids in zip(chunk, encoded, strict=True)
                            if item.val == (part == "val")]
                    if mine:
                        np.concatenate([a for _, ids in mine for a in (*start, ids, end)]).astype(dtype).tofile(out)
                    counts[part][0] += sum(len(ids) + 1 + len(start) for _, ids in mine)
                    counts[part][1] += sum(item.nbytes for item, _ in mine)
                progress.advance(documents=len(chunk), nbytes=sum(item.nbytes for item in chunk),
                                 tokens=sum(len(ids) + 1 + len(start) for ids in encoded))
        finally:
            reader.stop()
    if reader.kept == 0 or counts["train"][0] + counts["val"][0] == reader.kept * (1 + len(start)):
        removed = f" after data.clean removed {cleaner.removed}" if cleaner and cleaner.removed else ""
        raise DataError(f"the corpus is empty{removed}")
    train_tokens, val_tokens = counts["train"][0], counts["val"][0]
    if train_tokens == 0 or val_tokens == 0:  # too few documents to split by name: hold out the stream's tail
        train_tokens, val_tokens = _hold_out_tail(directory, dtype, val_fraction)
    return {"vocab_size": tok.get_vocab_size(), "dtype": dtype.name, "eos_id": eos, "eos": specials.eos,
            "bos_id": specials.bos_id, "fingerprint": reader.sha.hexdigest(), "documents": reader.documents,
            "train_tokens": train_tokens, "val_tokens": val_tokens,
            "train_bytes": counts["train"][1], "val_bytes": counts["val"][1]}


@dataclass(frozen=True)
class _Item:
    text: str
    nbytes: int  # UTF-8 size
    val: bool  # in the validation split


class _Reader(threading.Thread):
    """Reads documents into chunks of about _CHUNK_BYTES on a thread (file reads overlap encoding), hashing them in
    order and deciding their split; hands a DataError to the consumer, then None at the end."""

    def __init__(self, corpus: Corpus, chunks: queue.Queue, val_fraction: float, cleaner: Cleaner | None):
        super().__init__(daemon=True)
        self.corpus, self.chunks, self.val_fraction, self.cleaner = corpus, chunks, val_fraction, cleaner
        self.sha, self.documents, self.kept = hashlib.sha256(), 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            chunk, size = [], 0
            for doc in self.corpus.documents():
                text, raw = _utf8(doc.text)
                for piece in (doc.name.encode(), b"\0", raw, b"\0"):  # as corpus.fingerprint hashes
                    self.sha.update(piece)
                self.documents += 1
                if self.cleaner is not None and self.cleaner.reason(doc):  # still in the fingerprint: the raw corpus
                    continue
                self.kept += 1
                chunk.append(_Item(text, len(raw), is_validation(doc, self.val_fraction)))
                size += len(raw)
                if size >= _CHUNK_BYTES:
                    self._put(chunk)
                    chunk, size = [], 0
            if chunk:
                self._put(chunk)
            self._put(None)
        except BaseException as e:  # hand the error to the consumer rather than dying silently
            self._put(e)

    def _put(self, item) -> None:
        while not self._halt.is_set():
            try:
                self.chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _utf8(text: str) -> tuple[str, bytes]:
    """`text` and its UTF-8 bytes. Lone surrogates (a JSON "\\ud800" escape) become "?" in both, as the fingerprint
    reads them: tokenizers refuses such a string and tiktoken would replace them otherwise."""
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", errors="replace")
        return raw.decode("utf-8"), raw


def _hold_out_tail(directory: Path, dtype: np.dtype, val_fraction: float) -> tuple[int, int]:
    """Re-split one file's stream: the first 1 - val_fraction of it to train.bin, the rest to val.bin."""
    train, val = directory / "train.bin", directory / "val.bin"
    whole = train if train.stat().st_size else val
    os.replace(whole, directory / "stream.bin")
    stream = np.memmap(directory / "stream.bin", dtype=dtype, mode="r")
    cut = int(len(stream) * (1 - val_fraction))
    stream[:cut].tofile(train)
    stream[cut:].tofile(val)
    n = len(stream)
    del stream
    (directory / "stream.bin").unlink()
    return cut, n - cut


def _file_sha(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data.tokenizer: {path} is not a tokenizer.json file")
    return hashlib.sha256(path.read_bytes()).hexdigest()
