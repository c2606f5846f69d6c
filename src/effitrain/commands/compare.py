"""`effitrain compare RUN_DIR... | SWEEP_DIR`: runs side by side.

A table -- the config keys whose values differ, final and best validation loss, median tokens/s and MFU, peak
memory, training time -- and PNG plots in a compare/ folder: loss against step, tokens and training time (one line
per run, labelled by what differs), tokens/s and peak memory per run, and validation loss against tokens/s with the
runs no other run beats on both (the efficiency Pareto front). compare/data.json holds every plotted number.

Everything is read from the run directories (.hydra/config.yaml, metrics.jsonl, summary.json); nothing is rerun.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from effitrain.errors import UsageError

COLUMNS = ("run", "differs", "status", "final_val_loss", "best_val_loss", "median_tokens_per_s", "median_mfu_pct",
           "mem_reserved_peak_gib", "wall_time_s")


@dataclass
class Run:
    run_dir: Path
    config: dict  # flattened: {"optimizer.lr": 0.001, ...}
    records: list[dict]  # metrics.jsonl
    summary: dict  # summary.json ({} for a job that did not finish)
    status: str
    label: str = ""

    def curve(self) -> dict:
        """Per step: step, tokens seen, training time (sum of step times: evaluation left out) and loss; the
        evaluations' (step, val_loss)."""
        tokens = time_s = 0.0
        out = {"step": [], "tokens": [], "time_s": [], "loss": [], "val_step": [], "val_loss": []}
        for r in self.records:
            tokens += r["tokens_per_s"] * r["step_time_s"]  # tokens of this step (tokens_per_s = tokens / time)
            time_s += r["step_time_s"]
            out["step"].append(r["step"])
            out["tokens"].append(round(tokens))
            out["time_s"].append(time_s)
            out["loss"].append(r["loss"])
            if "val_loss" in r:
                out["val_step"].append(r["step"])
                out["val_loss"].append(r["val_loss"])
        return out


def load_run(run_dir: Path) -> Run:
    from omegaconf import OmegaConf

    from effitrain.runs import job_outcome, read_records, read_summary

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UsageError(f"{run_dir} is not a run directory (no .hydra/config.yaml)")
    return Run(run_dir, _flatten(OmegaConf.to_container(OmegaConf.load(saved))), read_records(run_dir),
               read_summary(run_dir), job_outcome(run_dir)[0])


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for k, v in node.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def expand(paths: list[Path]) -> list[Path]:
    """Run directories from the arguments: a sweep directory stands for its jobs."""
    from effitrain.runs import job_dirs

    if not paths:
        raise UsageError("compare needs run directories or a sweep directory: effitrain compare RUN_DIR... | SWEEP_DIR")
    runs = []
    for p in paths:
        if not p.is_dir():
            raise UsageError(f"{p} is not a directory")
        jobs = job_dirs(p)
        runs += jobs if jobs else [p]
    return runs


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def labels(runs: list[Run]) -> list[str]:
    """What tells each run apart: its overrides that not every run shares (as typed), else the config keys that
    differ (a group whose option differs shown as group=option), else its directory's name."""
    from effitrain.compose import GROUP_NAMES
    from effitrain.runs import job_overrides

    overrides = [job_overrides(r.run_dir) for r in runs]
    shared = set.intersection(*map(set, overrides)) if overrides else set()
    typed = [" ".join(o for o in job if o not in shared) for job in overrides]
    if all(typed) and len(set(typed)) == len(typed):
        return typed
    keys = differing_keys(runs)
    options = {k.split(".")[0] for k in keys if k.split(".")[0] in GROUP_NAMES and k.endswith(".name")}
    shown = [k for k in keys if k.split(".")[0] not in options] + [f"{g}.name" for g in sorted(options)]
    return [" ".join(f"{k.removesuffix('.name') if k.split('.')[0] in options else k}={r.config.get(k)}"
                     for k in shown) or r.run_dir.name for r in runs]


def rows(runs: list[Run]) -> list[dict]:
    out = []
    for r, label in zip(runs, labels(runs), strict=True):
        vals = [x["val_loss"] for x in r.records if "val_loss" in x]
        r.label = label
        out.append({"run": str(r.run_dir), "differs": r.label, "status": r.status,
                    "final_val_loss": r.summary.get("final_val_loss"), "best_val_loss": min(vals) if vals else None,
                    "median_tokens_per_s": r.summary.get("median_tokens_per_s"),
                    "median_mfu_pct": r.summary.get("median_mfu_pct"),
                    "mem_reserved_peak_gib": r.summary.get("mem_reserved_peak_gib"),
                    "wall_time_s": r.summary.get("wall_time_s")})
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (tokens/s, val loss) points no other point beats: as fast or faster and as low or lower,
    better in one."""
    def beats(q, p):
        return q[0] >= p[0] and q[1] <= p[1] and q != p
    return [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]


def write_comparison(run_dirs: list[Path], out_dir: Path) -> list[dict]:
    """Table (table.md, table.csv), plots and data.json in out_dir; the table's rows."""
    runs = [load_run(d) for d in run_dirs]
    table = rows(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "table.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |" for row in table]
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    data = {"runs": [{"label": r.label, "run_dir": str(r.run_dir), **r.curve()} for r in runs]}
    data["per_run"] = {key: {r.label: row[key] for r, row in zip(runs, table, strict=True)}
                       for key in ("median_tokens_per_s", "mem_reserved_peak_gib")}
    measured = [(r.label, row["median_tokens_per_s"], row["final_val_loss"]) for r, row in zip(runs, table,
                                                                                              strict=True)
                if row["median_tokens_per_s"] is not None and row["final_val_loss"] is not None]
    front = pareto_front([(tps, loss) for _, tps, loss in measured])
    data["pareto"] = {"points": [{"label": lbl, "tokens_per_s": tps, "final_val_loss": loss}
                                 for lbl, tps, loss in measured],
                      "front": [measured[i][0] for i in front]}
    (out_dir / "data.json").write_text(json.dumps(data, indent=2))
    _plot(data, out_dir)
    return table


def _plot(data: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    for x, xlabel in (("step", "step"), ("tokens", "tokens seen"), ("time_s", "training time (s, steps only)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in data["runs"]:
            ax.plot(run[x], run["loss"], label=run["label"], linewidth=1)
        ax.set(xlabel=xlabel, ylabel="training loss", title=f"loss vs {xlabel}")
        ax.legend(fontsize="small")
        fig.savefig(out_dir / f"loss_vs_{x}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    for key, ylabel, name in (("median_tokens_per_s", "median tokens/s", "tokens_per_s.png"),
                              ("mem_reserved_peak_gib", "peak reserved memory (GiB)", "peak_memory.png")):
        values = {k: v for k, v in data["per_run"][key].items() if v is not None}
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * max(len(values), 1)))
        ax.barh(list(values), list(values.values()))
        ax.set(xlabel=ylabel, title=f"{ylabel} per run")
        fig.savefig(out_dir / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = data["pareto"]["points"]
    ax.scatter([p["tokens_per_s"] for p in points], [p["final_val_loss"] for p in points], label="run")
    front = sorted((p for p in points if p["label"] in data["pareto"]["front"]), key=lambda p: p["tokens_per_s"])
    ax.plot([p["tokens_per_s"] for p in front], [p["final_val_loss"] for p in front], "r--o", label="Pareto front")
    for p in points:
        ax.annotate(p["label"], (p["tokens_per_s"], p["final_val_loss"]), fontsize="x-small")
    ax.set(xlabel="median tokens/s", ylabel="final validation loss", title="validation loss vs throughput")
    ax.legend(fontsize="small")
    fig.savefig(out_dir / "pareto.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def print_table(table: list[dict]) -> None:
    from rich.table import Table

    from effitrain.logging import console

    t = Table(title="compare")
    for column in COLUMNS[1:]:
        t.add_column(column)
    for row in table:
        t.add_row(*(_fmt(row[c]) for c in COLUMNS[1:]))
    console().print(t)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def compare_main(args: list[str]) -> int:
    """effitrain compare RUN_DIR... | SWEEP_DIR [--out DIR]: print the table, write compare/ (default: inside the
    sweep directory for one sweep, ./compare otherwise)."""
    out = None
    if "--out" in args:
        i = args.index("--out")
        if i + 1 >= len(args):
            raise UsageError("--out takes a directory")
        out, args = Path(args[i + 1]), args[:i] + args[i + 2:]
    paths = [Path(a) for a in args]
    run_dirs = expand(paths)
    if out is None:
        out = paths[0] / "compare" if len(paths) == 1 and run_dirs != paths else Path("compare")
    with_metrics = [d for d in run_dirs if (d / "metrics.jsonl").exists()]
    if not with_metrics:
        raise UsageError(f"no run among {', '.join(map(str, paths))} has metrics.jsonl to compare")
    table = write_comparison(with_metrics, out)
    print_table(table)
    print(f"plots and data: {out}/")
    return 0
