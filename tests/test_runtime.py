"""runtime.job_runtime: a job's process-wide settings are set at its start and restored at its end, so the next job
in the process (a sweep job, a reproduce, the next test) starts from what was there before."""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import pytest
import torch

from effitrain.engine.hostmem import keep_freed_memory
from effitrain.engine.runtime import job_runtime

CPU = torch.device("cpu")


def test_settings_hold_inside_and_are_restored_after():
    before = (torch.are_deterministic_algorithms_enabled(), torch.random.get_rng_state(), random.random(),
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    random.seed(7)  # restart the sequence the job must not disturb
    expected_next = random.random()
    random.seed(7)
    with job_runtime(seed=11, deterministic=True, tf32=True, device=CPU, keep_freed=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cuda.matmul.allow_tf32  # TF32 exists only on CUDA
        assert os.environ["MKL_CBWR"]  # set before the job computes (kept: MKL reads it once per process)
        seeded = torch.rand(3)
        random.random(), np.random.rand()
    assert torch.are_deterministic_algorithms_enabled() is before[0]
    assert random.random() == expected_next  # Python's generator is where it was
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == before[3]
    with job_runtime(seed=11, deterministic=False, tf32=False, device=CPU, keep_freed=False):
        assert torch.equal(torch.rand(3), seeded)  # the seed makes the job's draws, whatever ran before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_the_heap_policy_is_turned_off_again():
    with job_runtime(seed=0, deterministic=False, tf32=False, device=CPU, keep_freed=True):
        pass
    assert keep_freed_memory(False) is False  # nothing left on to turn off


def test_restored_even_when_the_job_fails():
    with pytest.raises(RuntimeError), job_runtime(seed=0, deterministic=True, tf32=False, device=CPU,
                                                  keep_freed=False):
        raise RuntimeError("the job failed")
    assert not torch.are_deterministic_algorithms_enabled()


def test_cpu_workers_split_the_cores_and_give_them_back(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with job_runtime(seed=0, deterministic=False, tf32=False, device=CPU, keep_freed=False):
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
    assert torch.get_num_threads() == before
