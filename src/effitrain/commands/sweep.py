"""A sweep's results: each job's outcome, and the end-of-sweep table (overrides, status and reason, final validation
loss, median tokens/s, peak memory) with the comparison plots.

A job that fails at run time is a result, not the end of the sweep: its directory gets status.json with a one-line
reason and the sweep goes on. The Hydra callback SweepSummary (configs/train.yaml: hydra.callbacks.sweep_summary)
reads every job directory of the sweep directory at its end -- jobs run by another process (a parallel or SLURM
launcher) and jobs of an earlier, resumed run of the sweep included -- writes summary.csv, summary.md and
summary.json there, prints the table and writes compare/ (effitrain.commands.compare).

A sweep is resumed (`effitrain resume SWEEP_DIR`, or the sweep's command with `sweep.resume=SWEEP_DIR`) by running
its saved command (multirun.yaml) again into the same directory: a job that finished (summary.json) is skipped, an
unfinished one continues from its latest checkpoint (or from step 0 when it saved none). The saved command is
replayed only once it passes effitrain.received's policy (nothing in it may run code or reach out unasked).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from hydra.experimental.callback import Callback

from effitrain.files import write_file
from effitrain.runs import STATUS_FILE, job_dirs, job_outcome, job_overrides, read_json

COLUMNS = ("job", "overrides", "status", "final_val_loss", "median_tokens_per_s", "mem_reserved_peak_gib", "reason",
           "run_dir")
# the last sweep this process ran: the CLI exits 1 when any of its jobs failed
last_sweep: dict = {}
# set while a resumed sweep runs (an environment variable: jobs a parallel or SLURM launcher starts inherit it)
RESUME_ENV = "EFFITRAIN_SWEEP_RESUME"
RESUME_KEY = "sweep.resume="


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def record_outcome(job_dir: Path, status: str, reason: str) -> None:
    """A job that ended without a summary: failed (a crash, OOM, NaN abort) or pruned (a search stopped it)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    write_file(job_dir / STATUS_FILE, json.dumps({"status": status, "reason": reason}, indent=2))


def resuming() -> bool:
    return bool(os.environ.get(RESUME_ENV))


def finished_before(job_dir: Path) -> dict | None:
    """In a resumed sweep, the summary of a job that finished before (it is skipped); None for a job to run, whose
    old outcome is cleared."""
    summary = job_dir / "summary.json"
    if resuming() and summary.exists():
        print(f"effitrain: {job_dir} finished before: skipped")
        return read_json(summary)
    (job_dir / STATUS_FILE).unlink(missing_ok=True)
    return None


def resume_arguments(args: list[str], *, allow_external: bool = False) -> list[str]:
    """A sweep's arguments with `sweep.resume=SWEEP_DIR`: SWEEP_DIR's own command (the other arguments must be it,
    or nothing), marked as a resumed sweep. Arguments without it come back as they are. The saved command is
    checked like anything read from a directory someone else may have made (effitrain.received)."""
    from effitrain.errors import UsageError
    from effitrain.received import sweep_command

    given = [a for a in args if a.startswith(RESUME_KEY)]
    if not given:
        return args
    sweep_dir = Path(given[-1][len(RESUME_KEY):])
    command = sweep_command(sweep_dir, allow_external=allow_external)

    def key(arguments):
        return sorted(a for a in arguments if a not in ("-m", "--multirun") and not a.startswith(
            ("hydra.sweep.dir=", RESUME_KEY)))
    if key(args) and key(args) != key(command):
        raise UsageError(f"{sweep_dir} was swept with: {' '.join(key(command))}; sweep.resume reruns that command "
                         "(give the same overrides, or none)")
    os.environ[RESUME_ENV] = str(sweep_dir)
    return command


def job_row(job_dir: Path, *, shared: set[str]) -> dict:
    """One table row from a job directory's saved overrides (those every job shares left out) and outcome."""
    overrides = " ".join(o for o in job_overrides(job_dir) if o not in shared)
    summary_file = job_dir / "summary.json"
    summary = read_json(summary_file) if summary_file.exists() else {}
    status, reason = job_outcome(job_dir)
    return {"job": job_dir.name, "overrides": overrides, "status": status,
            "final_val_loss": summary.get("final_val_loss"), "median_tokens_per_s": summary.get("median_tokens_per_s"),
            "mem_reserved_peak_gib": summary.get("mem_reserved_peak_gib"), "reason": reason, "run_dir": str(job_dir)}


def write_sweep_summary(sweep_dir: Path, jobs: list[Path]) -> list[dict]:
    per_job = [set(job_overrides(d)) for d in jobs]
    shared = set.intersection(*per_job) if len(per_job) > 1 else set()
    rows = [job_row(d, shared=shared) for d in jobs]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_file(sweep_dir / "summary.csv", table.getvalue())
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(row[c]).replace("|", "/") for c in COLUMNS) + " |" for row in rows]
    write_file(sweep_dir / "summary.md", "\n".join(md) + "\n")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "pruned")}
    write_file(sweep_dir / "summary.json", json.dumps({"jobs": len(rows), **counts, "rows": rows}, indent=2))
    return rows


def print_table(rows: list[dict], sweep_dir: Path) -> None:
    from rich.table import Table
    from rich.text import Text

    from effitrain.logging import console

    table = Table(title=f"sweep {sweep_dir}")
    for column in COLUMNS[:-1]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(Text(_fmt(row[c])) for c in COLUMNS[:-1]))  # Text: `data.paths=[x]` is no rich markup
    console().print(table)
    failed = sum(r["status"] == "failed" for r in rows)
    if failed:
        console().print(f"{failed} of {len(rows)} jobs failed (reasons above; each job's log is in its run_dir)")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarize_sweep(sweep_dir: Path) -> list[dict]:
    """Summary files, the printed table and compare/ for every job of sweep_dir; remembered for the exit code."""
    from effitrain.commands.compare import write_comparison

    jobs = job_dirs(sweep_dir)
    if not jobs:
        return []
    rows = write_sweep_summary(sweep_dir, jobs)
    print_table(rows, sweep_dir)
    finished = [d for d in jobs if (d / "metrics.jsonl").exists()]
    if finished:
        write_comparison(finished, sweep_dir / "compare")
    last_sweep.update(sweep_dir=str(sweep_dir), jobs=len(rows), failed=sum(r["status"] == "failed" for r in rows))
    return rows


class SweepSummary(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        last_sweep.clear()

    def on_multirun_end(self, config, **kwargs) -> None:
        summarize_sweep(Path(config.hydra.sweep.dir))
