"""Precision options side by side: the default model for N steps under each precision the device has.

    python scripts/bench_precision.py [--steps 120] [--json bench_precision.json] [extra overrides ...]

Each option trains in a fresh `effitrain train` process (same seed, data and steps), so memory peaks do not
mix. On CPU: fp32, fp16, bf16, bf16-pure (bf16-pure needs torchao); on a CUDA GPU also tf32, and fp8 where
the GPU has it (compute capability >= 8.9). Prints a table (tokens/s, peak memory, final validation loss and
its gap to fp32) and writes JSON.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

from _effitrain_run import bench_parser, run_effitrain


def options() -> list[str]:
    import torch

    out = ["fp32", "fp16", "bf16"]
    if importlib.util.find_spec("torchao"):
        out.append("bf16-pure")
    if torch.cuda.is_available():
        out.insert(1, "tf32")
        if torch.cuda.get_device_capability() >= (8, 9) and importlib.util.find_spec("torchao"):
            out.append("fp8")
    return out


def main() -> None:
    args = bench_parser(__doc__.splitlines()[0], steps=120, json_default="bench_precision.json").parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for option in options():
            overrides = [f"precision={option}", f"max_steps={args.steps}", f"eval_every={args.steps}",
                         *args.overrides]
            s = run_effitrain(overrides, Path(tmp) / option)
            rows.append({"precision": option, "tokens_per_s": s["median_tokens_per_s"],
                         "mem_peak_gib": s["mem_reserved_peak_gib"], "mfu_pct": s["median_mfu_pct"],
                         "final_val_loss": s["final_val_loss"], "final_loss": s["final_loss"]})
            print(f"  {option}: done", file=sys.stderr, flush=True)
    base = rows[0]["final_val_loss"]
    for r in rows:
        r["val_loss_gap_pct"] = 100.0 * (r["final_val_loss"] - base) / base
    print(f"\nprecision bench: {args.steps} steps, overrides {args.overrides or 'none'}\n")
    print("| precision | tokens/s | peak mem GiB | MFU % | final val loss | gap to fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        mfu = "null" if r["mfu_pct"] is None else f"{r['mfu_pct']:.2f}"
        print(f"| {r['precision']} | {r['tokens_per_s']:,.0f} | {r['mem_peak_gib']:.2f} | {mfu} | "
              f"{r['final_val_loss']:.4f} | {r['val_loss_gap_pct']:+.2f}% |")
    Path(args.json).write_text(json.dumps({"steps": args.steps, "overrides": args.overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
