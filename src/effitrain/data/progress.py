"""Progress of a data pass: a live line on a terminal, a log line every few seconds otherwise (files, MB, tokens,
MB/s, ETA), and a closing line either way."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("effitrain")

_LOG_EVERY_S = 5.0


class Progress:
    """Counts documents, bytes and tokens of one pass over `total_bytes` of input."""

    def __init__(self, label: str, *, total_bytes: int):
        self.label, self.total = label, max(total_bytes, 1)
        self.documents = self.nbytes = self.tokens = 0
        self._bar = None

    def __enter__(self) -> Progress:
        self._start = self._last = time.perf_counter()
        if sys.stderr.isatty():
            from rich.progress import Progress as Bar

            self._bar = Bar(transient=True)
            self._task = self._bar.add_task(self.label, total=self.total)
            self._bar.start()
        return self

    def advance(self, *, documents: int = 0, nbytes: int = 0, tokens: int = 0) -> None:
        self.documents += documents
        self.nbytes += nbytes
        self.tokens += tokens
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.nbytes, self.total), description=self.line(now))
        elif now - self._last >= _LOG_EVERY_S:
            self._last = now
            log.info(self.line(now))

    def line(self, now: float, *, done: bool = False) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.nbytes / elapsed
        if done:
            eta = f" in {elapsed:.1f} s"
        else:
            eta = f", ETA {max(self.total - self.nbytes, 0) / rate:.0f} s" if rate > 0 else ""
        tokens = f", {self.tokens:,} tokens" if self.tokens else ""
        return (f"data: {self.label}: {self.documents:,} documents, {self.nbytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB"
                f"{tokens}, {rate / 1e6:.1f} MB/s{eta}")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc[0] is None:
            log.info(self.line(time.perf_counter(), done=True))
