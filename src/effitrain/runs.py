"""Run directories -- every one effitrain makes is made here -- and what goes in them: environment capture,
summary, and the reproduce comparison.

`effitrain train` runs in the directory Hydra made from `hydra.run.dir` / `hydra.sweep.dir`; a worker started by
torchrun/srun from outside makes the same directory from the same setting (`new_run_dir`); `reproduce` writes next
to the original's parent (`reproduce_dir`)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

LAUNCH_TIME_ENV = "EFFITRAIN_LAUNCH_TIME"  # set by the CLI at entry; inherited by workers


def mark_launch() -> None:
    os.environ.setdefault(LAUNCH_TIME_ENV, repr(time.time()))


def seconds_since_launch() -> float:
    """Seconds from the user's command (or this process's start) to now."""
    if LAUNCH_TIME_ENV in os.environ:
        return time.time() - float(os.environ[LAUNCH_TIME_ENV])
    boot = float(Path("/proc/uptime").read_text().split()[0])
    start_ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return boot - start_ticks / os.sysconf("SC_CLK_TCK")


def new_run_dir(cfg, overrides: list[str]) -> Path:
    """Make the directory `hydra.run.dir` names (cfg composed with its hydra node) and save the config, the
    overrides and the hydra node in `.hydra/` as Hydra does, so reproduce and sweeps read it the same way."""
    from omegaconf import OmegaConf

    run_dir = Path(OmegaConf.select(cfg, "hydra.run.dir"))
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(job, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra)}), run_dir / ".hydra" / "hydra.yaml")
    return run_dir


def reproduce_dir(original: Path, outputs: Path = Path("outputs")) -> Path:
    """outputs/<date>/<time>_reproduce-<original name>, never an existing directory (made, with .hydra/)."""
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    base = outputs / f"{stamp}_reproduce-{original.resolve().name}"
    candidate, k = base, 1
    while candidate.exists():
        candidate, k = base.with_name(f"{base.name}-{k}"), k + 1
    (candidate / ".hydra").mkdir(parents=True)
    return candidate


def git_state() -> dict:
    """Commit and dirty flag of the effitrain source tree (null outside a git checkout)."""
    src = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(git("status", "--porcelain").stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None, "git_dirty": None}


def write_env(run_dir: Path, *, world, data, peak_flops, peak_flops_source: str, num_params: int) -> None:
    import torch
    import transformers

    device = world.device
    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "world_size": world.size, "cpu_threads": torch.get_num_threads(),
        "data_fingerprint": data.fingerprint, "data_documents": data.num_documents,
        "train_tokens": int(len(data.tokens.train)), "val_tokens": int(len(data.tokens.val)),
        "vocab_size": data.tokens.vocab_size, "num_params": num_params,
        "peak_flops": peak_flops, "peak_flops_source": peak_flops_source, "argv": sys.argv,
        **git_state(),
    }
    (run_dir / "env.json").write_text(json.dumps(env, indent=2))


def write_summary(run_dir: Path, recorder, *, warmup_steps: int, extra: dict) -> None:
    from effitrain.metrics import summarize

    summary = summarize(recorder.records, warmup_steps=warmup_steps) | extra
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_losses(run_dir: Path) -> list[float]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


def compare_losses(reference: list[float], candidate: list[float], *, rtol: float) -> tuple[str, bool]:
    """(verdict, matched): identical, within rtol, or the first step where they diverge."""
    if not reference:
        return "the original run has no metrics.jsonl steps to compare", False
    for step, (a, b) in enumerate(zip(reference, candidate, strict=False), 1):
        if not abs(a - b) <= rtol * max(abs(a), 1e-12):  # written so that a NaN on either side diverges
            return f"diverged at step {step}: original loss {a!r}, reproduced {b!r} (rtol {rtol:g})", False
    if len(candidate) != len(reference):
        return f"diverged: original has {len(reference)} steps, reproduction {len(candidate)}", False
    if reference == candidate:
        return f"identical: all {len(reference)} step losses match bit-for-bit", True
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(reference, candidate, strict=True))
    return f"within tolerance: {len(reference)} steps, max relative difference {worst:.2e} <= {rtol:g}", True
