"""Run directories -- every one effitrain makes is made here -- and what goes in them: environment capture,
summary, and the reproduce comparison.

`effitrain train` runs in the directory Hydra made from `hydra.run.dir` / `hydra.sweep.dir`; a worker started by
torchrun/srun from outside makes the same directory from the same setting (`new_run_dir`); `reproduce` writes next
to the original's parent (`reproduce_dir`)."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from effitrain.errors import UsageError, io_failure
from effitrain.files import write_file

log = logging.getLogger("effitrain")
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
    write_file(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(job))
    write_file(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    write_file(run_dir / ".hydra" / "hydra.yaml",
               OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra)})))
    return run_dir


def reproduce_dir(original: Path, outputs: Path = Path("outputs")):
    """A claim (effitrain.rundir.RunClaim) on outputs/<date>/<time>_reproduce-<original name>, never an existing
    directory (made, with .hydra/)."""
    from effitrain.rundir import RunClaim, make_unused

    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    base = outputs / f"{stamp}_reproduce-{original.resolve().name}"
    claim = RunClaim(make_unused(base), made=True)
    (claim.run_dir / ".hydra").mkdir()
    return claim


def config_hash(cfg) -> str:
    """A short hash of the job's config (everything but Hydra's own node), for manifests and comparisons."""
    import hashlib

    from omegaconf import OmegaConf

    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # hydra's node resolves only inside Hydra
    plain = OmegaConf.to_container(job, resolve=True)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


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


def write_env(run_dir: Path, *, world, data: dict, peak_flops, peak_flops_source: str, num_params: int,
              model: dict) -> None:
    """env.json; `data`: the data's fields (RunData.env: fingerprint, token counts, a mix's realised mixture);
    `model`: what the model is (model.model_identity)."""
    import torch
    import transformers

    device = world.device
    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "world_size": world.size, "cpu_threads": torch.get_num_threads(),
        **data, "model": model, "num_params": num_params,
        "peak_flops": peak_flops, "peak_flops_source": peak_flops_source, "argv": sys.argv,
        **git_state(),
    }
    write_file(run_dir / "env.json", json.dumps(env, indent=2))


def write_summary(run_dir: Path, recorder, *, warmup_steps: int, extra: dict) -> None:
    from effitrain.logging.metrics import summarize

    summary = summarize(recorder.records, warmup_steps=warmup_steps) | extra
    write_file(run_dir / "summary.json", json.dumps(summary, indent=2))


def read_summary(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / "summary.json", default={})


def read_json(path: Path, *, default=None):
    """A JSON file of a run directory (summary.json, env.json, ...), `default` when there is none: the one reader of
    them, so a damaged one is one line naming it wherever it is read (compare, scaling-fit, sweeps), not a traceback."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise UsageError(f"{path} is damaged, not JSON ({e})") from None
    except OSError as e:
        raise io_failure(e, path, doing="reading") from None


def read_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_records(run_dir)]


COMPARED = ("loss", "grad_norm", "lr", "val_loss")  # what reproduce checks at every step (val_loss where evaluated)
IDENTICAL, WITHIN, DIVERGED = 0, 3, 1  # reproduce's exit codes


def compare_records(reference: list[dict], candidate: list[dict], *, rtol: float,
                    after_step: int = 0) -> tuple[str, int]:
    """(verdict, exit code) comparing loss, grad_norm, lr and val_loss at every step after `after_step`:
    IDENTICAL (bit-for-bit), WITHIN (every value within rtol, relative) or DIVERGED (the first step and key that
    differ, a missing step, or a NaN on either side)."""
    reference = [r for r in reference if r["step"] > after_step]
    candidate = [r for r in candidate if r["step"] > after_step]
    if not reference:
        return "the original run has no metrics.jsonl steps to compare", DIVERGED
    worst = 0.0
    for a, b in zip(reference, candidate, strict=False):
        if a["step"] != b["step"]:
            return f"diverged: original step {a['step']} faces reproduced step {b['step']}", DIVERGED
        for key in COMPARED:
            if (key in a) != (key in b):
                return f"diverged at step {a['step']}: {key} is in only one of the runs", DIVERGED
            if key not in a:
                continue
            x, y = a[key], b[key]
            if not abs(x - y) <= rtol * max(abs(x), 1e-12):  # written so that a NaN on either side diverges
                return (f"diverged at step {a['step']}: original {key} {x!r}, reproduced {y!r} (rtol {rtol:g})",
                        DIVERGED)
            worst = max(worst, abs(x - y) / max(abs(x), 1e-12))
    if len(candidate) != len(reference):
        return f"diverged: original has {len(reference)} steps, reproduction {len(candidate)}", DIVERGED
    what = f"{len(reference)} steps" + (f" after step {after_step}" if after_step else "")
    if worst == 0.0:
        return f"identical: {what}, loss, grad_norm, lr and val_loss bit-for-bit", IDENTICAL
    return f"within tolerance: {what}, max relative difference {worst:.2e} <= {rtol:g}", WITHIN


PREEMPTED = "preempted.json"  # written by rank 0 when a signal stopped the run after a save; removed on resume


def write_preempted(run_dir: Path, *, step: int, message: str) -> None:
    write_file(run_dir / PREEMPTED, json.dumps({"step": step, "message": message}))


def read_preempted(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / PREEMPTED)


def read_records(run_dir: Path) -> list[dict]:
    """Every step record of metrics.jsonl. A last line cut short (a run killed mid-write) is left out with a warning;
    a damaged line with records after it is an error, not a silent cut (resume would rewrite the file without them)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as e:
        raise io_failure(e, path, doing="reading") from None
    records = []
    for number, line in enumerate(lines, 1):
        record = _record(line)
        if record is not None:
            records.append(record)
        elif number < len(lines):
            raise UsageError(f"{path}: line {number} of {len(lines)} is damaged, not a JSON record: {line[:60]!r}")
        else:
            log.warning("%s: its last line is cut short (a run stopped mid-write); read the %d records before it",
                        path, len(records))
    return records


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def truncate_metrics(run_dir: Path, *, step: int) -> list[dict]:
    """Keep metrics.jsonl's records up to `step` (a resumed run writes the steps after it again); the kept ones."""
    kept = [r for r in read_records(run_dir) if r["step"] <= step]
    write_file(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    return kept


STATUS_FILE = "status.json"  # a sweep job that did not finish: its status and one-line reason


def job_outcome(job_dir: Path) -> tuple[str, str | None]:
    """(status, reason): ok (summary.json written), failed or pruned (status.json), or failed without a word (the
    process died, or was killed, before it could say)."""
    if (job_dir / "summary.json").exists():
        return "ok", None
    if (job_dir / STATUS_FILE).exists():
        outcome = read_json(job_dir / STATUS_FILE)
        return outcome["status"], outcome["reason"]
    return "failed", "no summary.json: the job stopped before it finished"


def job_overrides(job_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    path = job_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.exists() else []


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep (those Hydra saved a config in), in job order."""
    found = [d for d in sweep_dir.iterdir() if (d / ".hydra" / "config.yaml").exists()] if sweep_dir.is_dir() else []
    return sorted(found, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
