"""prepare_data: corpus -> fingerprint -> split -> token cache (built once, then memory-mapped)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from effitrain.data.corpus import DataError, fingerprint, load_documents, split
from effitrain.data.tokens import TokenCache, cache_key, load_or_build


@dataclass(frozen=True)
class PreparedData:
    tokens: TokenCache
    fingerprint: str
    num_documents: int


def prepare_data(cfg) -> PreparedData:
    """Read the corpus, fingerprint it, and open (building once) its token cache.

    Args:
        cfg: the `data` config group.
    """
    docs = load_documents(cfg)
    if not docs or not any(d.text for d in docs):
        raise DataError(f"data={cfg.name}: the corpus is empty")
    fp = fingerprint(docs)
    key = cache_key(fingerprint=fp, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction)
    train_docs, val_docs = split(docs, cfg.val_fraction)
    cache = load_or_build(directory=Path(cfg.cache_dir).expanduser() / key, train_docs=train_docs, val_docs=val_docs,
                          tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction)
    return PreparedData(tokens=cache, fingerprint=fp, num_documents=len(docs))
