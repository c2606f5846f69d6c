"""The `logging` group (metrics sinks, console cadence, profiler) and the log set-up shared by the CLI and the
workers: rank 0 to the console, every rank to a file. The group's builder (its sinks) is in metrics.py."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("logging", key=None, builders="effitrain.logging.metrics",
              standalone="sinks write on the host from one buffered read of the step's metrics")


@GROUP.option("logging")
@dataclass
class LoggingConfig:
    every: int = 10  # metrics flushed (one host sync, one collective) and a console line every N steps
    progress: bool = True  # rich progress bar with ETA
    tensorboard: bool = False
    warmup_steps: int = 3  # first steps reported but left out of summary medians
    profile: bool = False
    profile_start_step: int = 5
    profile_steps: int = 3


@GROUP.checks
def check(cfg) -> None:
    if cfg.every < 1:
        raise UsageError(f"logging.every={cfg.every} must be a positive integer")
    if cfg.profile_start_step < 1 or cfg.profile_steps < 1:
        raise UsageError(f"logging.profile_start_step={cfg.profile_start_step} and logging.profile_steps="
                         f"{cfg.profile_steps} must be >= 1")


@lru_cache(maxsize=1)
def console():
    import shutil

    from rich.console import Console

    # logs and CI captures are not terminals: give metric lines room instead of wrapping at 80 columns
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    return Console(highlight=False, width=width)


def setup_logging(run_dir: Path, *, rank: int) -> None:
    """Rank 0: INFO to the console and train.log. Other ranks: rank_<k>.log, warnings to stderr too."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    file = RunLogHandler(run_dir / ("train.log" if rank == 0 else f"rank_{rank}.log"))
    file.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file)
    if rank == 0:
        root.addHandler(RichHandler(console=console(), show_path=False, show_time=False, markup=False))
    else:
        stderr = logging.StreamHandler()
        stderr.setLevel(logging.WARNING)
        stderr.setFormatter(logging.Formatter(f"[rank{rank}] %(levelname)s: %(message)s"))
        root.addHandler(stderr)
    for noisy in ("torch.distributed", "transformers", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_import_noise()


class RunLogHandler(logging.FileHandler):
    """train.log / rank_<k>.log. A write the disk refuses (full, or over a size limit) stops the run as one
    I/O-failure line, exit 74: logging's own handleError would print a traceback per record and train on unlogged.
    After that the handler writes nothing (the error's own cleanup logs too)."""

    failed = False

    def _open(self):  # never through a symlink (a received run directory's `train.log -> ~/.bashrc`)
        from effitrain.files import open_append

        return open_append(Path(self.baseFilename))

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        from effitrain.errors import io_failure

        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        self.failed = True
        raise io_failure(error, self.baseFilename, doing="writing the log") from None

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the flush of what the full disk refused, again: already reported
            if not self.failed:
                raise


# Warnings torchao's import prints on a machine without its CUDA kernels or Triton, and torch 2.13's deprecation of
# the enum registration torchao does: true of every CPU run, about nothing the user chose, and they would turn an
# error's one line into several.
_IMPORT_NOISE = {"torchao": ("Failed to load",), "torchao.kernel.intmm": ("Warning: Detected no triton",),
                 "torch.utils._pytree": ("<enum ",)}


def quiet_import_noise() -> None:
    for name, prefixes in _IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)
