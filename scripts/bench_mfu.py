"""Throughput, TFLOP/s and MFU per device of named effitrain runs (the GPU rows of BENCHMARKS.md).

    python scripts/bench_mfu.py                                  # every case, 30 steps each
    python scripts/bench_mfu.py --cases llama-1b-bf16 --steps 40 --json mfu.json

Each case is one `effitrain train` in a fresh process; its summary.json gives the medians over the steps after
`logging.warmup_steps` (compile and warm-up excluded, reported apart as warmup_time_s). MFU is effitrain's own:
model FLOPs (6N + 12·L·d·T per token) over the device's datasheet peak for the run's compute dtype (null for fp8:
no single honest peak). A case that fails (out of memory, fp8 on an old GPU) is reported as failed, not dropped.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from _effitrain_run import bench_parser, run_effitrain

# name -> overrides. seq_len 2048 and 8 sequences (16k tokens per step) for the ~1B model: enough work per step
# to fill an H100 while activations, AdamW state and fp32 master weights stay well inside 80 GB.
LLAMA_1B = ["model=llama-1b", "data.seq_len=2048", "batch_size=8", "eval_batches=2"]
CASES: dict[str, list[str]] = {
    "default-fp32": [],
    "default-fast-gpu": ["+experiment=fast-gpu"],
    "llama-1b-bf16": [*LLAMA_1B, "precision=bf16", "optimizer.implementation=fused"],
    "llama-1b-bf16-compile": [*LLAMA_1B, "+experiment=fast-gpu"],
    "llama-1b-fp8-compile": [*LLAMA_1B, "+experiment=fast-gpu", "precision=fp8"],
}


def main() -> int:
    parser = bench_parser(__doc__.splitlines()[0], steps=30, json_default="bench_mfu.json")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    args = parser.parse_args()
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            overrides = [*CASES[case], f"max_steps={args.steps}", f"eval_every={args.steps}", "logging.warmup_steps=5",
                         *args.overrides]
            rows.append(run_case(case, overrides, Path(tmp) / case))
            print(f"  {case}: {'done' if rows[-1]['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
    print_table(rows, args)
    Path(args.json).write_text(json.dumps({"steps": args.steps, "machine": machine(), "rows": rows}, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


def run_case(case: str, overrides: list[str], run_dir: Path) -> dict:
    t0 = time.perf_counter()
    try:
        s = run_effitrain(overrides, run_dir)
    except SystemExit as failed:  # keep going: the table says which case failed and why
        return {"case": case, "overrides": overrides, "ok": False, "error": str(failed)[-600:]}
    env = json.loads((run_dir / "env.json").read_text())
    return {"case": case, "overrides": overrides, "ok": True, "wall_s": time.perf_counter() - t0,
            "tokens_per_s_per_device": s["median_tokens_per_s_per_device"],
            "tflops_per_device": s["median_tflops_per_device"], "mfu_pct": s["median_mfu_pct"],
            "step_time_s": s["median_step_time_s"], "mem_active_peak_gib": s["mem_active_peak_gib"],
            "mem_reserved_peak_gib": s["mem_reserved_peak_gib"], "warmup_time_s": s.get("warmup_time_s"),
            "startup_s": s.get("startup_s"), "final_loss": s["final_loss"], "final_val_loss": s["final_val_loss"],
            "num_params": env.get("num_params"), "peak_flops": env.get("peak_flops"),
            "peak_flops_source": env.get("peak_flops_source")}


def print_table(rows: list[dict], args) -> None:
    print(f"\n{machine()} | {args.steps} steps per case | extra overrides: {args.overrides or 'none'}\n")
    print("| case | tokens/s/device | TFLOP/s/device | MFU % | step s | peak active GiB | warm-up s | final loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if not r["ok"]:
            print(f"| {r['case']} | failed: {r['error'].splitlines()[-1][:80]} | | | | | | |")
            continue
        mfu = "null" if r["mfu_pct"] is None else f"{r['mfu_pct']:.1f}"
        tflops = "null" if r["tflops_per_device"] is None else f"{r['tflops_per_device']:.1f}"
        print(f"| {r['case']} | {r['tokens_per_s_per_device']:,.0f} | {tflops} | {mfu} | {r['step_time_s']:.3f} | "
              f"{r['mem_active_peak_gib']:.2f} | {r['warmup_time_s'] or 0:.1f} | {r['final_loss']:.4f} |")


def machine() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
