"""Corpora as ordered streams of documents, with a listing fingerprint, a content fingerprint and a split.

A source's builder gives a `Corpus`: its files in a fixed order and how to read one file's documents. Nothing
is read until asked, and then one file at a time, so a corpus of any size streams through in bounded memory.
The listing (names, sizes, mtimes) identifies it without reading it; the content fingerprint (sha256 over names
and texts, in order) identifies the exact corpus a run trained on; the split depends on document names alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from effitrain.data import GROUP, DataError, resolve_paths, source_configs

# Parts of the stdlib that are bulky, generated or not representative prose/code.
_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
                "tkinter", "ensurepip", "__pycache__", "config-3"}
_TOPICS = "pydoc_data/topics.py"  # the stdlib's prose half: the language reference's help topics


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class SourceFile:
    name: str  # relative to the data.paths entry that found it: identity does not depend on where it lies
    path: Path


@dataclass(frozen=True)
class Corpus:
    """A source's files, in order, and the reader that turns one file into its documents."""

    files: list[SourceFile]
    read: Callable[[SourceFile], Iterator[Document]]
    file_per_document: bool  # each file is one document named like the file (the split is known before reading)
    reader: str  # how files become documents (source and its options): the same files read otherwise differ

    def documents(self, files: Iterable[SourceFile] | None = None) -> Iterator[Document]:
        for file in self.files if files is None else files:
            yield from self.read(file)

    def total_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)

    def listing(self) -> str:
        """sha256 over the reader and (name, size, mtime) of every file: a stat per file, no reading."""
        h = hashlib.sha256(f"{self.reader}\0".encode())
        for f in self.files:
            st = os.stat(f.path)
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return h.hexdigest()


def build_corpus(cfg) -> Corpus:
    """The `data` group's corpus (its source's builder)."""
    return GROUP.builder_of(cfg.source)(cfg)


def load_documents(cfg) -> list[Document]:
    """Every document of the corpus in memory, in order (small corpora and tests; the pipeline streams)."""
    return list(build_corpus(cfg).documents())


@GROUP.builder("mix")
def mix_corpora(cfg) -> dict[str, Corpus]:
    """data=mix: {name: Corpus} of its sources, each built by its option's builder (data.mix prepares them)."""
    return {name: build_corpus(sub) for name, (_, sub) in source_configs(cfg).items()}


@GROUP.builder("text")
def text_corpus(cfg) -> Corpus:
    return Corpus(_named_files(cfg.source, list(cfg.paths)), read=_read_text, file_per_document=True, reader="text")


@GROUP.builder("jsonl")
def jsonl_corpus(cfg) -> Corpus:
    def read(file: SourceFile) -> Iterator[Document]:
        return _jsonl_documents(file, cfg.field)

    return Corpus(_named_files(cfg.source, list(cfg.paths)), read=read, file_per_document=False,
                  reader=f"jsonl:{cfg.field}")


@GROUP.builder("datasets")
def datasets_corpus(cfg) -> Corpus:
    """Local parquet/arrow/json/csv files through Hugging Face `datasets` (data/hf.py; imported only to read)."""
    def read(file: SourceFile) -> Iterator[Document]:
        from effitrain.data.hf import read_rows

        return (Document(name, text) for name, text in read_rows(file.path, name=file.name, field=cfg.field))

    return Corpus(_named_files(cfg.source, list(cfg.paths)), read=read, file_per_document=False,
                  reader=f"datasets:{cfg.field}")


@GROUP.builder("stdlib")
def stdlib_corpus(cfg) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for parent, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]  # prune: site-packages alone can hold 10k+ files
        paths += [Path(parent, n) for n in names if n.endswith(".py")]
    files = [SourceFile(str(p.relative_to(root)), p) for p in sorted(paths)]
    # the topics module last, as its topics: listed by its file, so the listing still covers it
    files.append(SourceFile("pydoc_data.topics", root / _TOPICS))
    return Corpus(files, read=_read_stdlib, file_per_document=False, reader="stdlib")


def _read_stdlib(file: SourceFile) -> Iterator[Document]:
    if file.name != "pydoc_data.topics":
        yield from _read_text(file)
        return
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(f"pydoc_data.topics/{key}", topics[key])


def _read_text(file: SourceFile) -> Iterator[Document]:
    try:
        yield Document(file.name, file.path.read_text(encoding="utf-8", errors="replace"))
    except OSError as e:
        raise DataError(f"{file.path}: cannot read ({e.strerror or e})") from None


def _named_files(source: str, paths: list[str]) -> list[SourceFile]:
    """Each file named relative to the data.paths directory that holds it (else by its own name): the split and
    the fingerprint then depend on the corpus, not on where it lies on disk. String prefixes, not
    Path.relative_to: the files come from those directories' own paths, and a cached run names every file."""
    prefixes = [str(root).rstrip(os.sep) + os.sep for raw in paths if (root := Path(raw).expanduser()).is_dir()]

    def name(file: Path) -> str:
        text = str(file)
        return next((text[len(p):] for p in prefixes if text.startswith(p)), file.name)

    return [SourceFile(name(f), f) for f in resolve_paths(source=source, paths=paths)]


def _jsonl_documents(file: SourceFile, field: str) -> Iterator[Document]:
    path = file.path
    try:
        f = path.open("rb")  # bytes: a line that is not UTF-8 is found at its own line, not the buffer's first
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    yield _jsonl_document(raw, field, where=f"{path}:{lineno}", name=f"{file.name}:{lineno}")
        except OSError as e:
            raise DataError(f"{path}:{lineno + 1}: cannot read ({e.strerror or e})") from None


def json_line(raw: bytes, *, where: str):
    """One JSON line's value; a line that is not UTF-8 or not JSON is one DataError naming `where` (file:line)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def _jsonl_document(raw: bytes, field: str, *, where: str, name: str) -> Document:
    record = json_line(raw, where=where)
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{where}: no key {field!r} (set data.field to the key holding the text)")
    return Document(name, str(record[field]))


def fingerprint(docs: Iterable[Document]) -> str:
    """sha256 over every document's name and text, in order (streams: one document at a time)."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.name.encode())
        h.update(b"\0")
        h.update(doc.text.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()


def _bucket(name: str, salt: bytes = b"") -> float:
    return int.from_bytes(hashlib.sha256(salt + name.encode()).digest()[:4], "big") / 2**32


def is_validation(doc: Document | SourceFile, val_fraction: float) -> bool:
    """Deterministic split by a hash of the document name, independent of order and machine."""
    return _bucket(doc.name) < val_fraction


def in_tokenizer_sample(doc: Document | SourceFile, fraction: float) -> bool:
    """Deterministic sample for training the tokenizer: a hash of the name, salted apart from the split's."""
    return _bucket(doc.name, b"tokenizer-sample\0") < fraction


def split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents; validation may be empty for corpora of very few documents."""
    val = [d for d in docs if is_validation(d, val_fraction)]
    train = [d for d in docs if not is_validation(d, val_fraction)]
    return train, val

