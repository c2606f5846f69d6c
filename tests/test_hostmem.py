"""cpu_keep_freed_memory: a freed step buffer is reused from the heap, not faulted in again from the OS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from effitrain.hostmem import keep_freed_memory

def faults_per_alloc(n=5):  # minor page faults of allocating + touching + freeing a 16 MB buffer, after a warm-up
    for _ in range(4):  # glibc settles a freed chunk into reusable space within a few rounds
        x = torch.empty(4 << 20).fill_(1); del x
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        x = torch.empty(4 << 20).fill_(1); del x
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // n

print(faults_per_alloc(), keep_freed_memory(True), faults_per_alloc(), keep_freed_memory(False))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keeping_freed_memory_stops_the_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    default, kept = int(out[0]), int(out[2])
    assert out[1] == out[3] == "True"  # applied, and turned off again (glibc's thresholds restored)
    assert default > 1000  # by default the 16 MB (4096 pages) are faulted in again on (nearly) every allocation
    assert kept == 0


def test_turning_off_what_was_never_on_touches_nothing():
    from effitrain.hostmem import keep_freed_memory

    assert keep_freed_memory(False) is False
