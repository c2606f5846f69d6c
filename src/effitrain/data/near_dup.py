"""Near-duplicate documents by MinHash LSH (datasketch): a document is a near duplicate when the Jaccard similarity
of its word shingles to an earlier kept document is at least the threshold.

Streaming and bounded by the number of kept documents, not their size: per kept document the index holds its name,
its MinHash signature (num_perm 32-bit values) and its LSH band keys, never its text. Candidates the LSH bands
find are confirmed with the signatures' estimated Jaccard, so the threshold means what it says (LSH alone also
returns pairs somewhat below it). Deterministic: fixed permutations (seed), a stable hash of the words, and the
corpus's own order (the first of a near-duplicate group is kept).
"""

from __future__ import annotations

import zlib

import numpy as np

from effitrain.errors import UsageError

_SEED = 1  # of the MinHash permutations: fixed, so the same corpus and settings remove the same documents
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier combining the word hashes of a shingle
_BATCH = 8192  # shingles per update: datasketch permutes a batch as a [batch, num_perm] array (4 MiB at 128)


def _datasketch():
    try:
        import datasketch
    except ImportError:
        raise UsageError("data.clean.near_dup_threshold needs the datasketch package: pip install effitrain[data]") \
            from None
    return datasketch


class NearDuplicates:
    """`match(name, text)`: (the earlier kept document's name, estimated Jaccard) when `text` nearly duplicates
    it, else None, and the document is indexed as kept."""

    def __init__(self, *, threshold: float, num_perm: int, shingle_words: int):
        ds = _datasketch()
        self.threshold, self.shingle_words = threshold, shingle_words
        try:
            self.lsh = ds.MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError as e:  # a threshold near 1 wants fewer than two bands of this many permutations
            raise UsageError(f"data.clean.near_dup_threshold={threshold}, near_dup_num_perm={num_perm}: {e}; raise "
                             "near_dup_num_perm or lower the threshold") from None
        self._template = ds.MinHash(num_perm=num_perm, seed=_SEED)  # permutations made once, shared by every doc
        self.signatures: dict[str, np.ndarray] = {}

    def match(self, name: str, text: str) -> tuple[str, float] | None:
        shingles = self._shingles(text)
        if shingles.size == 0:  # no words: nothing to compare (the quality filters judge empty documents)
            return None
        sig = self._minhash(shingles)
        best = max(((float(np.mean(self.signatures[k] == sig.hashvalues)), k) for k in self.lsh.query(sig)),
                   default=None)
        if best is not None and best[0] >= self.threshold:
            return best[1], round(best[0], 3)
        self.lsh.insert(name, sig, check_duplication=False)  # names are unique within a corpus
        self.signatures[name] = sig.hashvalues
        return None

    def _shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit hashes of every run of `shingle_words` words (all the words when fewer), vectorised: a
        crc32 per word (stable across processes, unlike hash()), combined per window as a polynomial mod 2^64."""
        words = text.lower().split()
        h = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
        if len(h) == 0:
            return h
        k = min(self.shingle_words, len(h))
        n = len(h) - k + 1
        combined = np.zeros(n, dtype=np.uint64)
        for j in range(k):
            combined = combined * _MIX + h[j:j + n]  # wraps mod 2^64, as intended
        return np.unique(combined >> np.uint64(32))

    def _minhash(self, shingles: np.ndarray):
        t = self._template
        sig = type(t)(num_perm=len(t), seed=_SEED, permutations=t.permutations, scheme=t.scheme, hashfunc=int)
        for start in range(0, len(shingles), _BATCH):  # the hashes are ours: datasketch permutes them, keeps minima
            sig.update_batch(shingles[start:start + _BATCH])
        return sig
