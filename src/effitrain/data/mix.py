"""data=mix: several corpora in one run, each drawn in proportion to its weight, all sharing one tokenizer.

`data.sources` (schema MixData, checked by source_configs, both in data/__init__.py) maps a source name to
`{option, weight, <that option's own keys>}` (text: paths; jsonl: paths, field); the mix's other keys (vocab_size,
seq_len, val_fraction, clean, cache_dir, ...) hold for every source. Each source is prepared exactly as its option
alone would be, given the mix's tokenizer (`data.tokenizer`, or a BPE trained on an equal share of
`data.tokenizer_sample_mb` from each source, cached by the sources' listings), so each keeps its own token cache:
changing the weights re-tokenizes nothing.

Sampling stays a pure function of the sample's index g in the run (so of seed, step, micro-step and rank): g lies
in block g // BLOCK, which holds each source's count (the largest-remainder split of BLOCK by the weights) in an
order shuffled by (seed, block); the k-th sample of a source is window k of that source's own WindowSampler (its own
epochs, without repeats within one). Every whole block has exactly its counts, so the realised share of each source
is its weight's share within 1/BLOCK plus one partial block.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from effitrain.data import SFT_SOURCES, SHARED_KEYS, DataError, source_configs

BLOCK = 4096  # samples per block: the realised shares are the weights' within 1/BLOCK over whole blocks


@dataclass(frozen=True)
class RunData:
    """The data a run trains on: one source, or several mixed by weight (`mixed`), all tokenized with one
    tokenizer. `sources` maps a name to its PreparedData (a single source is named like its option)."""

    sources: dict
    weights: dict[str, float]
    mixed: bool

    @property
    def tokenizer_dir(self) -> Path:
        """A directory holding the run's tokenizer.json (every source's cache holds the same one)."""
        return next(iter(self.sources.values())).tokenizer_dir

    @property
    def vocab_size(self) -> int:
        return next(iter(self.sources.values())).vocab_size

    @property
    def train_tokens(self) -> int:
        return sum(d.train_tokens for d in self.sources.values())

    @property
    def fingerprint(self) -> str:
        """The corpus's fingerprint; a mix's: sha256 over each source's name, weight and fingerprint."""
        if not self.mixed:
            return next(iter(self.sources.values())).fingerprint
        parts = [[name, self.weights[name], d.fingerprint] for name, d in self.sources.items()]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def sampler(self, *, seq_len: int, seed: int):
        """The training sampler: the source's own (a text source's WindowSampler, a fine-tuning source's
        RowSampler), or a MixSampler over the sources of weight > 0."""
        if not self.mixed:
            return next(iter(self.sources.values())).sampler(seq_len=seq_len, seed=seed)
        samplers = {}
        for name, d in self.sources.items():
            if self.weights[name] > 0:  # a source of weight 0 is evaluated only: it may hold no training window
                with _named(name):
                    samplers[name] = d.sampler(seq_len=seq_len, seed=_source_seed(seed, name))
        return MixSampler(samplers, {name: self.weights[name] for name in samplers}, seed=seed)

    def validation(self, **kwargs) -> dict[str, list]:
        """{name: its fixed validation batches} (loader.validation_batches' arguments; a fine-tuning source's rows
        of held-out samples)."""
        out = {}
        for name, d in self.sources.items():
            with _named(name if self.mixed else None):
                out[name] = d.validation_set(**kwargs)
        return out

    def evaluate(self, sets: dict[str, list], *, loss_of) -> dict:
        """val_loss and val_ppl on the validation batches `sets` (from `validation`); a mix adds val_loss/<name> per
        source, and its val_loss is theirs averaged by weight, as training draws them (weight 0: reported only).

        Args:
            sets: validation batches per source.
            loss_of: `batches -> mean loss` (the engine's evaluation of the model being trained or evaluated).
        """
        per_source = {name: loss_of(batches) for name, batches in sets.items()}
        val_loss = sum(self.weights[name] * loss for name, loss in per_source.items()) / sum(self.weights.values())
        metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        return metrics | ({f"val_loss/{name}": loss for name, loss in per_source.items()} if self.mixed else {})

    def report(self) -> dict:
        """data_report.json: the source's cleaning report, or {"sources": {name: report}} for a mix."""
        reports = {name: d.report() for name, d in self.sources.items()}
        return {"sources": reports} if self.mixed else next(iter(reports.values()))

    def env(self, sampler, *, samples: int, seq_len: int) -> dict:
        """env.json's data fields; a mix adds `mixture`: each source's weight, its realised share of the run's
        `samples` training windows (those the sampler draws for steps 1..max_steps), windows, tokens, epochs over
        its training windows, and its own token counts and fingerprint."""
        env = {"data_fingerprint": self.fingerprint,
               "data_documents": sum(d.num_documents for d in self.sources.values()),
               "train_tokens": self.train_tokens,
               "val_tokens": sum(d.val_tokens for d in self.sources.values()),
               "vocab_size": self.vocab_size}
        if self.mixed:
            drawn = sampler.counts(0, samples)
            total = sum(self.weights.values())
            env["mixture"] = {"samples": samples, "block": BLOCK, "sources": {name: {
                "weight": self.weights[name], "target_share": self.weights[name] / total,
                "share": drawn.get(name, 0) / samples, "windows": drawn.get(name, 0),
                "tokens": drawn.get(name, 0) * seq_len,
                "epochs": drawn[name] / sampler.samplers[name].num_windows if name in drawn else 0.0,
                "train_tokens": int(d.train_tokens), "val_tokens": int(d.val_tokens),
                "documents": d.num_documents, "fingerprint": d.fingerprint}
                for name, d in self.sources.items()}}
        return env


def prepare_run_data(cfg) -> RunData:
    """The run's data: prepare_data for one source; for data=mix, the shared tokenizer, then each source's cache.

    Args:
        cfg: the `data` config group.
    """
    from effitrain.data.prepare import prepare_data

    if cfg.source in SFT_SOURCES:  # fine-tuning samples, not a token stream (data/sft.py)
        from effitrain.data.sft import prepare_sft

        return prepare_sft(cfg)
    if cfg.source != "mix":
        return RunData(sources={cfg.name: prepare_data(cfg)}, weights={cfg.name: 1.0}, mixed=False)
    sources = source_configs(cfg)
    # fine-tuning sources render with the model's tokenizer (data.run_data_config; the checks require one)
    tokenizer = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else _shared_bpe(cfg, sources)
    prepared = {}
    for name, (_, sub) in sources.items():
        sub.tokenizer = str(tokenizer)
        with _named(name):
            if sub.source in SFT_SOURCES:
                from effitrain.data.sft import prepare_sft

                prepared[name] = prepare_sft(sub)
            else:
                prepared[name] = prepare_data(sub)
    return RunData(sources=prepared, weights={name: w for name, (w, _) in sources.items()}, mixed=True)


def _shared_bpe(cfg, sources: dict) -> Path:
    """The mix's BPE (tokens.train_bpe on every source's corpus), cached under cache_dir/tokenizers/ by the sources'
    listings (names, sizes, mtimes: nothing is read when it exists) and the settings; not by the weights."""
    from effitrain.data.corpus import build_corpus
    from effitrain.data.tokens import settings_of, train_bpe

    corpora = {name: _naming(name, build_corpus(sub)) for name, (_, sub) in sources.items()}
    own = {name: {k: v for k, v in sub.items() if k not in SHARED_KEYS} for name, (_, sub) in sources.items()}
    key = [settings_of(cfg), [[name, c.listing(), str(own[name])] for name, c in corpora.items()]]
    path = (Path(cfg.cache_dir).expanduser() / "tokenizers" /
            hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] / "tokenizer.json")
    if not path.exists():
        tok, _ = train_bpe(list(corpora.values()), cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(tok.to_str())
        os.replace(tmp, path)  # complete or absent
    return path


class _named:
    """Prefix a DataError raised inside with the source's name (None: as it is)."""

    def __init__(self, name: str | None):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if self.name is not None and isinstance(error, DataError):
            raise DataError(f"data.sources.{self.name}: {error}") from None
        return False


def _naming(name: str, corpus):
    """`corpus` whose bad data (a DataError while reading) names the source too."""
    def read(file):
        with _named(name):
            yield from corpus.read(file)

    return replace(corpus, read=read)


def _source_seed(seed: int, name: str) -> int:
    """Each source's own window order: sources of one size do not walk their windows in step."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:4], "big")


def block_counts(weights: dict[str, float], block: int = BLOCK) -> dict[str, int]:
    """Samples per block for each source: floor(block * share), the rest to the largest remainders (ties: by name)."""
    total = sum(weights.values())
    exact = {name: block * w / total for name, w in weights.items()}
    counts = {name: int(math.floor(x)) for name, x in exact.items()}
    for name in sorted(exact, key=lambda n: (-(exact[n] - counts[n]), n))[:block - sum(counts.values())]:
        counts[name] += 1
    return counts


class MixSampler:
    """Windows of several sources in proportion to their weights: `windows(first, count)` as WindowSampler's, for
    TrainBatches, so (step, micro-step, rank) -> batch stays a pure function (module docstring).

    Args:
        samplers: {name: that source's sampler (WindowSampler, or a fine-tuning source's RowSampler)}, for the sources
            of weight > 0.
        weights: {name: weight > 0}.
        seed: the run's seed (the blocks' order).
    """

    def __init__(self, samplers: dict, weights: dict[str, float], *, seed: int):
        self.names = sorted(samplers)
        self.samplers = samplers
        self.per_block = np.array([block_counts(weights)[name] for name in self.names])
        self.seed = seed
        from effitrain.data.sft import RowSampler

        self.samples = any(isinstance(s, RowSampler) for s in samplers.values())  # a fine-tuning source: rows
        self._block, self._labels, self._ranks = -1, None, None

    def windows(self, first: int, count: int):
        """Samples first..first+count-1 of the run, as an int64 tensor [count, seq_len+1]; with a fine-tuning
        source among them, as rows (data/sft.py: SftBatch; a text window's every token trained)."""
        import torch

        picks = [self.locate(g) for g in range(first, first + count)]
        if self.samples:
            from effitrain.data.sft import cat_rows, window_rows

            rows = [self.samplers[self.names[source]].windows(k, 1) for source, k in picks]
            return cat_rows([r if not isinstance(r, torch.Tensor) else window_rows(r) for r in rows])
        rows = []
        for source, k in picks:
            sampler = self.samplers[self.names[source]]
            rows.append(sampler._window(sampler._index(k)))
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def locate(self, g: int) -> tuple[int, int]:
        """(source index into `names`, k): sample g of the run is the k-th sample of that source."""
        block, pos = divmod(g, BLOCK)
        labels, ranks = self._order(block)
        source = int(labels[pos])
        return source, block * int(self.per_block[source]) + int(ranks[pos])

    def counts(self, first: int, count: int) -> dict[str, int]:
        """Samples of each source among samples first..first+count-1 (what `windows` would draw)."""
        def before(g: int) -> np.ndarray:  # per source, among samples 0..g-1
            block, pos = divmod(g, BLOCK)
            return block * self.per_block + np.bincount(self._order(block)[0][:pos], minlength=len(self.names))

        drawn = before(first + count) - before(first)
        return {name: int(n) for name, n in zip(self.names, drawn, strict=True)}

    def _order(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The block's source labels in their shuffled order, and each position's rank among its source's."""
        if block != self._block:
            rng = np.random.default_rng([self.seed % 2**63, block, 0x6D6978])  # "mix": apart from the windows' seeds
            labels = rng.permutation(np.repeat(np.arange(len(self.names)), self.per_block))
            order = np.argsort(labels, kind="stable")
            starts = np.concatenate([[0], np.cumsum(self.per_block)[:-1]])
            ranks = np.empty(BLOCK, dtype=np.int64)
            ranks[order] = np.arange(BLOCK) - starts[labels[order]]
            self._block, self._labels, self._ranks = block, labels, ranks
        return self._labels, self._ranks
