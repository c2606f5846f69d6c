"""Metrics overhead: the share of the run's wall time spent on metrics, at several flush intervals.

    python scripts/bench_metrics.py [--steps 40] [--every 1 10] [--json bench_metrics.json] [extra overrides ...]

Each row is one `effitrain train` of the default model in a fresh process with `logging.every=E`: per-step values
stay on the device and one flush every E steps reads them back (one host sync) and reduces them across ranks (one
collective). `metrics_overhead_pct` is what the trainer measured itself (summary.json): host time in memory stats,
buffering, the flush's collective, rates and sinks, over the run's wall time. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from _effitrain_run import bench_parser, run_effitrain


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], steps=40, json_default="bench_metrics.json")
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10], help="logging.every values to compare")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for every in args.every:
            overrides = [f"logging.every={every}", f"max_steps={args.steps}", f"eval_every={args.steps}",
                         *args.overrides]
            summary = run_effitrain(overrides, Path(tmp) / str(every))
            rows.append({"every": every, "metrics_overhead_pct": summary["metrics_overhead_pct"],
                         "median_step_time_s": summary["median_step_time_s"],
                         "median_tokens_per_s": summary["median_tokens_per_s"], "wall_time_s": summary["wall_time_s"]})
            print(f"  logging.every={every}: done", file=sys.stderr, flush=True)
    print(f"\nmetrics overhead: {args.steps} steps, overrides {args.overrides or 'none'}\n")
    print("| logging.every | metrics overhead % | median step ms | median tokens/s | wall s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['every']} | {r['metrics_overhead_pct']:.3f} | {1000 * r['median_step_time_s']:.1f} | "
              f"{r['median_tokens_per_s']:,.0f} | {r['wall_time_s']:.1f} |")
    Path(args.json).write_text(json.dumps({"steps": args.steps, "overrides": args.overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
