"""Optimizers side by side: optimizer-state bytes per rank, step time and final loss after N steps.

    python scripts/bench_optim.py [--steps 60] [--json bench_optim.json] [extra overrides ...]

Each optimizer trains the default model in a fresh `effitrain train` process (same seed, data, schedule and
steps). zero1 shards AdamW's state over DDP ranks, so it runs at world size 2 next to plain AdamW at world
size 2 (gloo on CPU): its saving is the difference between those two rows. adamw-8bit needs torchao. The
state size is what the optimizer logged after its first step (optim.state_bytes: this rank's local tensors,
torchao's packed 8-bit codes and scales counted as stored). Prints a table and writes JSON.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

from _effitrain_run import bench_parser, run_effitrain

DDP2 = ["parallel=ddp", "launcher.nproc_per_node=2"]


def runs() -> list[tuple[str, list[str]]]:
    out = [("adamw", []), ("sgd", []), ("adafactor", []), ("muon", [])]
    if importlib.util.find_spec("torchao"):
        out.append(("adamw-8bit", []))
    return out + [("adamw", DDP2), ("zero1", DDP2)]


def train(overrides: list[str], run_dir: Path) -> tuple[dict, int]:
    """One `effitrain train` run in its own process: its summary and the optimizer-state bytes it logged."""
    summary = run_effitrain(overrides, run_dir)
    state = re.search(r"of state on this rank \((\d+) bytes\)", (run_dir / "train.log").read_text())
    return summary, int(state.group(1))


def main() -> None:
    args = bench_parser(__doc__.splitlines()[0], steps=60, json_default="bench_optim.json").parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (option, layout) in enumerate(runs()):
            overrides = [f"optimizer={option}", f"max_steps={args.steps}", f"eval_every={args.steps}", *layout,
                         *args.overrides]
            summary, state = train(overrides, Path(tmp) / str(i))
            rows.append({"optimizer": option, "ranks": 2 if layout else 1, "state_bytes_per_rank": state,
                         "step_time_s": summary["median_step_time_s"], "final_loss": summary["final_loss"],
                         "final_val_loss": summary["final_val_loss"]})
            print(f"  {option} x{rows[-1]['ranks']}: done", file=sys.stderr, flush=True)
    print(f"\noptimizer bench: {args.steps} steps, overrides {args.overrides or 'none'}\n")
    print("| optimizer | ranks | state per rank MiB | vs adamw | step time ms | final loss | final val loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {r["ranks"]: r["state_bytes_per_rank"] for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        r["state_vs_adamw"] = r["state_bytes_per_rank"] / base[r["ranks"]] if r["ranks"] in base else None
        print(f"| {r['optimizer']} | {r['ranks']} | {r['state_bytes_per_rank'] / 2**20:.2f} | "
              f"{r['state_vs_adamw']:.2f}x | {1000 * r['step_time_s']:.0f} | {r['final_loss']:.4f} | "
              f"{r['final_val_loss']:.4f} |")
    Path(args.json).write_text(json.dumps({"steps": args.steps, "overrides": args.overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
