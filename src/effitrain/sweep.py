"""End-of-sweep table: one row per job (overrides, final validation loss, median tokens/s, peak memory).

A Hydra callback (configs/train.yaml: hydra.callbacks.sweep_summary) that writes summary.csv and
summary.md into the sweep directory and prints the table.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback

COLUMNS = ("job", "overrides", "status", "final_val_loss", "median_tokens_per_s", "mem_reserved_peak_gib", "run_dir")


def job_overrides(job_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    path = job_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.exists() else []


def job_row(job_dir: Path, *, shared: set[str]) -> dict:
    """One table row from a job directory's saved overrides (those every job shares left out) and summary."""
    overrides = " ".join(o for o in job_overrides(job_dir) if o not in shared)
    summary_file = job_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return {"job": job_dir.name, "overrides": overrides, "status": "ok" if summary else "failed",
            "final_val_loss": summary.get("final_val_loss"), "median_tokens_per_s": summary.get("median_tokens_per_s"),
            "mem_reserved_peak_gib": summary.get("mem_reserved_peak_gib"), "run_dir": str(job_dir)}


def write_sweep_summary(sweep_dir: Path, job_dirs: list[Path]) -> list[dict]:
    per_job = [set(job_overrides(d)) for d in job_dirs]
    shared = set.intersection(*per_job) if len(per_job) > 1 else set()
    rows = [job_row(d, shared=shared) for d in job_dirs]
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(md) + "\n")
    return rows


def print_table(rows: list[dict], sweep_dir: Path) -> None:
    from rich.table import Table

    from effitrain.logs import console

    table = Table(title=f"sweep {sweep_dir}")
    for column in COLUMNS[:-1]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_fmt(row[c]) for c in COLUMNS[:-1]))
    console().print(table)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.job_dirs: list[Path] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        self.job_dirs.append(Path(HydraConfig.get().runtime.output_dir))

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.job_dirs:
            return
        sweep_dir = self.job_dirs[0].parent
        jobs = sorted(self.job_dirs, key=lambda d: int(d.name) if d.name.isdigit() else 0)
        rows = write_sweep_summary(sweep_dir, jobs)
        print_table(rows, sweep_dir)
