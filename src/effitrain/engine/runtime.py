"""Everything process-wide a job sets -- seeds, determinism, TF32, MKL's reproducible mode, the CPU heap policy,
cuBLAS's workspace, CPU threads per worker -- set at job start and restored at job end, in one place.

Sweep jobs, `reproduce` and the tests run several jobs in one process: a setting one job leaves behind (TF32 on,
deterministic algorithms, glibc thresholds) must not leak into the next.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

import numpy as np
import torch

from effitrain.engine.hostmem import keep_freed_memory

# Bitwise-reproducible CPU matmuls. MKL may pick a different kernel (so a different summation order) for a buffer's
# memory alignment, and where the data-prefetch thread's allocations land moves with thread timing. MKL reads this
# once, at its first call: it is set at the first job's start (before it computes anything; a value the user set
# wins) and, since MKL keeps it for the process's life, not restored.
MKL_CBWR = "AUTO,STRICT"
CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS refuses deterministic algorithms without a fixed workspace


@contextmanager
def job_runtime(*, seed: int, deterministic: bool, tf32: bool, device: torch.device, keep_freed: bool):
    """Set the process-wide state of one job; restore what was there before when it ends (even on error).

    Args:
        seed: seeds torch (CPU and CUDA), Python's random and NumPy.
        deterministic: torch.use_deterministic_algorithms (and cuBLAS's workspace on CUDA).
        tf32: allow TF32 matmuls and convolutions (CUDA only; off elsewhere).
        device: the job's device.
        keep_freed: CPU: keep freed step memory in the glibc heap (hostmem.py).
    """
    saved_env = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, rng_state(), torch.get_num_threads())
    if MKL_CBWR is not None:  # None: scripts/bench_repro.py measuring runs without it
        os.environ.setdefault("MKL_CBWR", MKL_CBWR)
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    _set_deterministic(deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32 and device.type == "cuda")
    seed_everything(seed)
    if device.type == "cpu" and (threads := worker_threads()) is not None:
        torch.set_num_threads(threads)
    kept = device.type == "cpu" and keep_freed_memory(keep_freed)
    try:
        yield
    finally:
        if kept:
            keep_freed_memory(False)
        deterministic_before, matmul_tf32, cudnn_tf32, rngs, threads_before = saved
        torch.set_num_threads(threads_before)
        _set_deterministic(deterministic_before)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
        set_rng_state(rngs)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _set_deterministic(on: bool) -> None:
    """torch.use_deterministic_algorithms, only when it changes: the call imports torch._inductor (~2.7 s of every
    process's start) even to set the value already there."""
    if torch.are_deterministic_algorithms_enabled() != on:
        torch.use_deterministic_algorithms(on)


def worker_threads() -> int | None:
    """CPU threads for one of several workers on this node (they share its cores: one thread per core each would
    thrash), or None: one process, or OMP_NUM_THREADS set by the user."""
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    if local_size <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // local_size)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """This process's generator states (torch CPU and CUDA, Python, NumPy), for TrainState: tensors, numbers and
    tuples only (NumPy's key array as a tensor), so a checkpoint holding them loads with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
             "gauss": float(gauss)}
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": numpy}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
