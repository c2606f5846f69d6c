"""Batches of packed token windows: a stateless, resumable, rank-sharded sampler and a prefetcher.

The token stream is cut into windows of seq_len+1 tokens (stride seq_len, so every token is a target
once). Sample g of the run is window perm_e[g mod n] with e = g div n and perm_e a permutation seeded
by (seed, e): the batch for any (step, micro-step, rank) is a pure function of those numbers, so
resuming needs only the step, and ranks read disjoint shares of each global batch.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from effitrain.data.corpus import DataError


@dataclass(frozen=True)
class Shard:
    """Where this process sits in the global batch."""

    rank: int = 0  # data-parallel rank
    world: int = 1  # data-parallel world size


class WindowSampler:
    def __init__(self, tokens: np.ndarray, *, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"corpus has {len(tokens)} tokens: fewer than one window of data.seq_len={seq_len}")
        self._epoch, self._perm = -1, None

    def windows(self, first: int, count: int) -> torch.Tensor:
        """Windows number first..first+count-1 of the run, as an int64 tensor [count, seq_len+1]."""
        rows = [self._window(self._index(g)) for g in range(first, first + count)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def _index(self, g: int) -> int:
        epoch, pos = divmod(g, self.num_windows)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_windows, generator=gen).numpy()
        return int(self._perm[pos])

    def _window(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1])


class TrainBatches:
    """Micro-batches for (step, micro_step) of this shard: rows [rank*b, (rank+1)*b) of each micro-step's slice."""

    def __init__(self, sampler: WindowSampler, *, batch_size: int, grad_accum_steps: int, shard: Shard):
        self.sampler, self.batch_size, self.accum, self.shard = sampler, batch_size, grad_accum_steps, shard
        self.global_batch = batch_size * grad_accum_steps * shard.world  # sequences per optimizer step

    def get(self, step: int, micro_step: int) -> torch.Tensor:
        first = step * self.global_batch + (micro_step * self.shard.world + self.shard.rank) * self.batch_size
        return self.sampler.windows(first, self.batch_size)

    def iterate(self, start_step: int, max_steps: int):
        for step in range(start_step, max_steps):
            for micro in range(self.accum):
                yield self.get(step, micro)


def validation_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, num_batches: int, shard: Shard):
    """A fixed validation set: the first windows of the held-out stream, split evenly across ranks.

    Every rank gets the same number of windows (and so of batches): under FSDP/TP each eval forward is a
    collective, and a rank with one batch more would wait forever for the others.
    """
    sampler = WindowSampler(tokens, seq_len=seq_len, seed=0)
    per_rank = min(num_batches * batch_size, sampler.num_windows // shard.world)
    if per_rank == 0:
        raise DataError(f"the validation split has {sampler.num_windows} windows of data.seq_len={seq_len}: fewer than "
                        f"one per rank ({shard.world}); raise data.val_fraction or lower data.seq_len")
    mine = [i for i in range(per_rank * shard.world) if i % shard.world == shard.rank]
    return [torch.from_numpy(np.stack([sampler._window(i) for i in mine[k:k + batch_size]]).astype(np.int64))
            for k in range(0, len(mine), batch_size)]


class Prefetcher:
    """Prepares the next `depth` batches on a background thread (pinned for async H2D copy on CUDA)."""

    def __init__(self, batches, *, depth: int, pin: bool):
        self._pin = pin
        self._it = iter(batches)
        self._q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._sync = depth == 0
        if not self._sync:
            self._thread = threading.Thread(target=self._fill, daemon=True)
            self._thread.start()

    def _prepare(self, batch):
        return batch.pin_memory() if self._pin else batch

    def _fill(self):
        try:
            for batch in self._it:
                self._q.put(self._prepare(batch))
        except BaseException as e:  # hand the error to the consumer rather than dying silently
            self._q.put(e)
        self._q.put(None)

    def next(self) -> torch.Tensor:
        if self._sync:
            return self._prepare(next(self._it))
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise StopIteration
        return item
