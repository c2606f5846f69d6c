"""Corpora as ordered lists of documents, with a content fingerprint and a deterministic split.

Every source yields (name, text) pairs in a fixed order, so the fingerprint (sha256 over names and
texts) identifies the exact corpus a run trained on, and the split depends on names alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from effitrain.data import GROUP, DataError, resolve_paths

# Parts of the stdlib that are bulky, generated or not representative prose/code.
_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
                "tkinter", "ensurepip", "__pycache__", "config-3"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def load_documents(cfg) -> list[Document]:
    """Documents of the `data` group's corpus, in a deterministic order (its source's builder)."""
    return GROUP.builder_of(cfg.source)(cfg)


@GROUP.builder("text")
def text_documents(cfg) -> list[Document]:
    return [Document(name, f.read_text(encoding="utf-8", errors="replace"))
            for name, f in _named_files(cfg.source, list(cfg.paths))]


@GROUP.builder("jsonl")
def jsonl_documents(cfg) -> list[Document]:
    return [doc for name, f in _named_files(cfg.source, list(cfg.paths))
            for doc in _jsonl_documents(f, cfg.field, name=name)]


def _named_files(source: str, paths: list[str]) -> list[tuple[str, Path]]:
    return [(_relative_name(f, paths), f) for f in resolve_paths(source=source, paths=paths)]


def _relative_name(file: Path, paths: list[str]) -> str:
    """A document's name relative to the data.paths entry that found it: the split and the fingerprint
    then depend on the corpus, not on where it lies on disk."""
    for raw in paths:
        root = Path(raw).expanduser()
        if root.is_dir() and file.is_relative_to(root):
            return str(file.relative_to(root))
    return file.name


@GROUP.builder("stdlib")
def stdlib_documents(cfg) -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for parent, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]  # prune: site-packages alone can hold 10k+ files
        files += [Path(parent, n) for n in names if n.endswith(".py")]
    files.sort()
    docs = [Document(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    from pydoc_data.topics import topics  # the prose half: the language reference's help topics

    docs += [Document(f"pydoc_data.topics/{key}", topics[key]) for key in sorted(topics)]
    return docs


def _jsonl_documents(path: Path, field: str, *, name: str) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{lineno}: no key {field!r} (set data.field to the key holding the text)")
            docs.append(Document(f"{name}:{lineno}", str(record[field])))
    return docs


def fingerprint(docs: list[Document]) -> str:
    """sha256 over every document's name and text, in order."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.name.encode())
        h.update(b"\0")
        h.update(doc.text.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()


def is_validation(doc: Document, val_fraction: float) -> bool:
    """Deterministic split by a hash of the document name, independent of order and machine."""
    bucket = int.from_bytes(hashlib.sha256(doc.name.encode()).digest()[:4], "big") / 2**32
    return bucket < val_fraction


def split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents; validation may be empty for corpora of very few documents."""
    val = [d for d in docs if is_validation(d, val_fraction)]
    train = [d for d in docs if not is_validation(d, val_fraction)]
    return train, val
