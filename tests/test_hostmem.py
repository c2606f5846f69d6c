"""cpu_keep_freed_memory: a freed step buffer is reused from the heap, not faulted in again from the OS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, statistics, torch
from effitrain.engine.hostmem import keep_freed_memory

def faults_per_step(rounds=9):  # median minor page faults of a "step" that allocates, touches and frees 4 x 16 MB
    faults = [0] * rounds
    for i in range(rounds):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [torch.empty(4 << 20).fill_(1) for _ in range(4)]; del buffers
        faults[i] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return int(statistics.median(faults))  # the median: the first steps grow the heap, later ones reuse it

# glibc's mmap threshold is dynamic (it rises after a large mmapped chunk is freed), so what a process did before
# decides how later allocations are served; setting the thresholds through this module and back pins glibc's
# documented defaults, so the "before" is the same everywhere. Several buffers freed together, as in a training
# step, coalesce into space the next step's (64-byte aligned) buffers fit in; a single one freed alone may not.
keep_freed_memory(True); keep_freed_memory(False)
print(faults_per_step(), keep_freed_memory(True), faults_per_step(), keep_freed_memory(False))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keeping_freed_memory_stops_the_page_faults():
    # up to 3 probes: the kernel's own proactive reclaim (DAMON's kdamond runs on the CI box) can page out a kept
    # buffer of an idle-looking heap while the suite loads the machine; keeping that fails shows in every probe
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
        default, kept = int(out[0]), int(out[2])
        assert out[1] == out[3] == "True"  # applied, and turned off again (glibc's thresholds restored)
        if default == 0:  # mallopt took no effect: the process's malloc is not glibc's (an LD_PRELOADed jemalloc...)
            pytest.skip("this process's malloc does not return freed memory to the OS, so there is nothing to keep")
        assert default > 10000  # at glibc's defaults the 64 MB (16384 pages) are faulted in again every step
        if kept == 0:
            break
    assert kept == 0


def test_turning_off_what_was_never_on_touches_nothing():
    from effitrain.engine.hostmem import keep_freed_memory

    assert keep_freed_memory(False) is False
