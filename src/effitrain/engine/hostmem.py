"""Host memory on CPU runs: keep what a training step frees inside the process heap.

glibc serves large allocations with mmap and returns them with munmap, and trims the top of its heap when a lot
is free. A CPU training step frees and re-allocates the same activation buffers every step, so each step faults
its activations in again as fresh zeroed pages: thousands of minor faults and milliseconds of system time per step
of the default model (`python scripts/bench_repro.py --runs 2 --compare cpu_keep_freed_memory=false,true`; numbers
in BENCHMARKS.md). Raising glibc's mmap and trim thresholds
keeps that memory in the heap for the next step. The price: the process's RSS stays at its peak between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
KEEP = 1 << 30  # thresholds high enough that a step's buffers stay in the heap
GLIBC_DEFAULT = 128 * 1024  # glibc's initial thresholds, restored when a later job in the process turns it off

_kept = False


def keep_freed_memory(enable: bool) -> bool:
    """Keep freed memory in the heap (enable) or restore glibc's thresholds; True when glibc applied it.

    A no-op off glibc (macOS, musl) and when turning off what this process never turned on.
    """
    global _kept
    if platform.libc_ver()[0] != "glibc" or (not enable and not _kept):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    value = KEEP if enable else GLIBC_DEFAULT
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, value)) and bool(libc.mallopt(M_TRIM_THRESHOLD, value))
    _kept = enable and applied
    return applied
