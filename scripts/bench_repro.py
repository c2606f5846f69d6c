"""Repeat a short `effitrain train` N times: distinct loss trajectories, MFU, page faults / system time per step.

    python scripts/bench_repro.py                                   # 4 runs of the default model, 30 steps
    python scripts/bench_repro.py --runs 6 --unset-env MKL_CBWR     # without effitrain's MKL_CBWR=AUTO,STRICT
    python scripts/bench_repro.py --runs 2 --steps 60 --compare cpu_keep_freed_memory=false,true
    python scripts/bench_repro.py --runs 4 data.prefetch=0          # extra overrides go to every run

Every run is a fresh process on the default config with `batch_size=8` (8 x 128 tokens per step) and one
validation batch, plus the overrides given. `--compare KEY=V1,V2,...` runs each value as a setting, interleaved
(V1 V2 V1 V2 ...), so neighbouring runs share the machine's load. `--unset-env NAME` removes NAME from the
environment before torch starts, to measure one of effitrain's own defaults (MKL_CBWR: effitrain's
runtime.job_runtime sets it at job start unless the user did; MKL reads it at its first call).

Per run: the loss trajectory (every step's training loss and the final validation loss, compared exactly; runs
with the same trajectory share a letter), the first step where it differs from run 1, median tokens/s and MFU
(summary.json, with the peak's source from env.json: repeats show whether MFU holds still), and per optimizer
step the minor page faults and system CPU time of the process (all threads, `getrusage` read by an optimizer
step post-hook: the difference between consecutive steps, median over the steps after `--warmup`), plus the
same counters for the whole process. Prints a table and writes JSON; exits 1
when the runs do not all share one trajectory.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import string
import sys
import tempfile
from pathlib import Path

from _effitrain_run import bench_parser, machine, run_effitrain

BASE = ["batch_size=8", "eval_batches=1"]
SUMMARIZED = ("tokens_per_s", "mfu_pct", "minor_faults_per_step", "sys_ms_per_step", "minor_faults_total",
              "sys_s_total")
CHILD = "--child"  # internal: this script run as the CLI with the probe (argv: --child STAMPS UNSET train ...)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        return child(*sys.argv[2:4], sys.argv[4:])
    parser = bench_parser(__doc__.splitlines()[0], steps=30, json_default="bench_repro.json")
    parser.add_argument("--runs", type=int, default=4, help="runs per setting")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the per-step medians")
    parser.add_argument("--compare", help="KEY=V1,V2,...: one setting per value, run interleaved")
    parser.add_argument("--unset-env", action="append", default=[], metavar="NAME",
                        help="remove NAME from the environment before torch starts (repeatable)")
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        parser.error(f"--steps {args.steps} leaves no step after --warmup {args.warmup}")
    settings = [[]]
    if args.compare:
        key, _, values = args.compare.partition("=")
        settings = [[f"{key}={v}"] for v in values.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for setting in settings:
                run_dir = Path(tmp) / str(len(runs))
                overrides = [*BASE, f"max_steps={args.steps}", f"eval_every={args.steps}", *args.overrides, *setting]
                runs.append(measure(overrides, run_dir, setting=" ".join(setting) or "-", warmup=args.warmup,
                                    unset=args.unset_env))
                print(f"  run {i + 1}/{args.runs} {runs[-1]['setting']}: {runs[-1]['tokens_per_s']:,.0f} tok/s",
                      file=sys.stderr, flush=True)
    trajectories = label_trajectories(runs)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              "command": " ".join(["bench_repro.py", *sys.argv[1:]]), "steps": args.steps, "warmup": args.warmup,
              "unset_env": args.unset_env, "overrides": [*BASE, *args.overrides],
              "distinct_trajectories": trajectories, "settings": summarize(runs), "runs": runs}
    print_table(report)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")
    return 0 if trajectories == 1 else 1


def measure(overrides: list[str], run_dir: Path, *, setting: str, warmup: int, unset: list[str]) -> dict:
    stamps_path = run_dir.with_suffix(".stamps.json")
    summary = run_effitrain(overrides, run_dir, entry=[__file__, CHILD, str(stamps_path), ",".join(unset)])
    probe = json.loads(stamps_path.read_text())
    steps = probe["steps"]
    deltas = [{k: b[k] - a[k] for k in a} for a, b in zip(steps, steps[1:], strict=False)][warmup:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trajectory = [r["loss"] for r in records] + [records[-1].get("val_loss")]
    env = json.loads((run_dir / "env.json").read_text())
    return {"setting": setting, "overrides": overrides, "tokens_per_s": summary["median_tokens_per_s"],
            "mfu_pct": summary["median_mfu_pct"], "peak_flops": env["peak_flops"],
            "peak_flops_source": env["peak_flops_source"],
            "minor_faults_per_step": statistics.median(d["minflt"] for d in deltas),
            "sys_ms_per_step": 1000 * statistics.median(d["stime"] for d in deltas),
            "minor_faults_total": probe["end"]["minflt"], "sys_s_total": probe["end"]["stime"],
            "user_s_total": probe["end"]["utime"], "trajectory": trajectory}


def label_trajectories(runs: list[dict]) -> int:
    """Letter each run by its loss trajectory (A = run 1's) and the first step where it leaves run 1's."""
    letters: dict[tuple, str] = {}
    first = runs[0]["trajectory"]
    for r in runs:
        r["trajectory_id"] = letters.setdefault(tuple(r["trajectory"]), string.ascii_uppercase[len(letters) % 26])
        r["first_step_differing"] = next((i + 1 for i, (x, y) in enumerate(zip(r["trajectory"], first, strict=True))
                                          if x != y), None)  # the val loss counts as step max_steps + 1
    return len(letters)


def summarize(runs: list[dict]) -> list[dict]:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        rs = [r for r in runs if r["setting"] == setting]
        out.append({"setting": setting, "runs": len(rs), "trajectories": "".join(r["trajectory_id"] for r in rs),
                    **{f"median_{k}": _median([r[k] for r in rs]) for k in SUMMARIZED}})
    return out


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]  # MFU is null for fp8
    return statistics.median(values) if values else None


def print_table(report: dict) -> None:
    print(f"\n{report['machine']} | {report['steps']} steps per run ({report['warmup']} warm-up) | overrides "
          f"{' '.join(report['overrides'])} | unset env: {', '.join(report['unset_env']) or 'none'}\n")
    print("| run | setting | tokens/s | MFU % | peak source | minor faults/step | sys ms/step | "
          "minor faults (process) | sys s (process) | trajectory | first step differing |")
    print("| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for i, r in enumerate(report["runs"], 1):
        print(f"| {i} | {r['setting']} | {r['tokens_per_s']:,.0f} | {_pct(r['mfu_pct'])} | {r['peak_flops_source']} | "
              f"{r['minor_faults_per_step']:,.0f} | {r['sys_ms_per_step']:.1f} | {r['minor_faults_total']:,} | "
              f"{r['sys_s_total']:.2f} | "
              f"{r['trajectory_id']} | {r['first_step_differing'] or '-'} |")
    print("\n| setting | runs | trajectories | median tokens/s | median MFU % | minor faults/step | sys ms/step | "
          "minor faults (process) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for s in report["settings"]:
        print(f"| {s['setting']} | {s['runs']} | {s['trajectories']} | {s['median_tokens_per_s']:,.0f} | "
              f"{_pct(s['median_mfu_pct'])} | "
              f"{s['median_minor_faults_per_step']:,.0f} | {s['median_sys_ms_per_step']:.1f} | "
              f"{s['median_minor_faults_total']:,.0f} |")
    print(f"\n{report['distinct_trajectories']} distinct loss trajectories in {len(report['runs'])} runs")


def _pct(value: float | None) -> str:
    return "null" if value is None else f"{value:.1f}"


def child(stamps_path: str, unset: str, cli_argv: list[str]) -> int:
    """`effitrain` in this process, with a probe of the process's page faults and CPU time at each optimizer step."""
    import effitrain.engine.runtime

    for name in filter(None, unset.split(",")):
        os.environ.pop(name, None)
        if name == "MKL_CBWR":  # effitrain's own default, set at job start: measure the run without it
            effitrain.engine.runtime.MKL_CBWR = None
    import resource

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from effitrain.cli import main as effitrain_main

    def usage() -> dict:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return {"minflt": u.ru_minflt, "stime": u.ru_stime, "utime": u.ru_utime}

    steps: list[dict] = []
    register_optimizer_step_post_hook(lambda *_: steps.append(usage()))
    rc = effitrain_main(cli_argv)
    Path(stamps_path).write_text(json.dumps({"steps": steps, "end": usage()}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
