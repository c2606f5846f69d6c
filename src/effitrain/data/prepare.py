"""prepare_data: corpus -> token cache, found from the corpus's listing without reading it once it is built.

`cache_dir/listings/<listing+settings>.json` remembers which cache (keyed by content fingerprint + settings) a
listing of (name, size, mtime) per file and the reader (source, data.field) produced: a second run stats the files,
opens the memmaps, and reads no document. A changed file changes its size or mtime, so the listing misses and the
corpus is read (and, when its content is unchanged after all, lands on the same cache); the same files read by
another source are another listing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from effitrain.data.corpus import build_corpus
from effitrain.data.tokens import TokenCache, build_cache, open_cache, settings_of


@dataclass(frozen=True)
class PreparedData:
    tokens: TokenCache
    fingerprint: str  # sha256 over the documents' names and texts
    num_documents: int

    # what a mix reads of each source, alike for a text source and fine-tuning samples (data/sft.py: SftData)
    @property
    def tokenizer_dir(self) -> Path:
        return self.tokens.directory

    @property
    def vocab_size(self) -> int:
        return self.tokens.vocab_size

    @property
    def train_tokens(self) -> int:
        return len(self.tokens.train)

    @property
    def val_tokens(self) -> int:
        return len(self.tokens.val)

    def sampler(self, *, seq_len: int, seed: int):
        """The training windows, shuffled per epoch (data/loader.py: WindowSampler)."""
        from effitrain.data.loader import WindowSampler

        return WindowSampler(self.tokens.train, seq_len=seq_len, seed=seed)

    def validation_set(self, **kwargs) -> list:
        """This rank's fixed validation batches (loader.validation_batches' arguments)."""
        from effitrain.data.loader import validation_batches

        return validation_batches(self.tokens.val, **kwargs)

    def report(self) -> dict:
        """data_report.json: the cleaning report of the cache's build."""
        return json.loads((self.tokens.directory / "data_report.json").read_text())


def prepare_data(cfg) -> PreparedData:
    """Open the corpus's token cache, building it first (streaming) when this listing has none.

    Args:
        cfg: the `data` config group.
    """
    corpus = build_corpus(cfg)
    root = Path(cfg.cache_dir).expanduser()
    settings = settings_of(cfg)
    index = root / "listings" / (hashlib.sha256(json.dumps([corpus.listing(), settings], sort_keys=True).encode())
                                 .hexdigest()[:20] + ".json")
    cache = open_cache(root / json.loads(index.read_text())["cache"]) if index.exists() else None
    if cache is None:
        cache = open_cache(build_cache(root, corpus, cfg, settings))
        _atomic_write(index, json.dumps({"cache": cache.directory.name, "fingerprint": cache.meta["fingerprint"]}))
    return PreparedData(tokens=cache, fingerprint=cache.meta["fingerprint"], num_documents=cache.meta["documents"])


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
