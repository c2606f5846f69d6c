"""Checkpoint cost: save and load time, bytes on disk, the stall a save causes, and the checksums' share of both, sync
vs async, single vs fsdp(2).

    python scripts/bench_checkpoint.py [--steps 8] [--every 2] [--layouts single fsdp] [--json bench_checkpoint.json]
                                       [extra overrides, e.g. model=llama-20m]

Each row is one `effitrain train` (default: model=llama-150m, batch 1 x 128 tokens, no evaluation) in a fresh
process saving every `--every` steps, then one `effitrain resume` of it with max_steps raised by one (the load).
From the run's own records: per save the seconds until complete and the seconds training waited (manifest.json:
save_s, stall_s; async waits only for planning and the copy to host memory), bytes on disk (all ranks), the load
time (train.log's "loaded in"), and the median step time of the steps right after a save vs the others (an async
write competes with training for the same cores). The stall target: async stall < 10% of the sync save time.
Checksums: per save the seconds rank 0 spent hashing (xxh3-128) and fsyncing every file (manifest.json: hash_s;
training waits for it, so stall_s includes it; save_s does not), and on load rank 0's seconds verifying the files
it reads (train.log's "checksums verified in"); targets: each < 10% of the save / the load.
Prints a table and writes JSON.
"""

from __future__ import annotations

import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _effitrain_run import machine, run_effitrain

BASE = ["model=llama-150m", "batch_size=1", "eval_batches=1", "logging.every=1", "checkpoint.keep_last=0"]
LAYOUTS = {"single": [], "fsdp": ["parallel=fsdp", "launcher.nproc_per_node=2"]}


def one(layout: str, kind: str, *, steps: int, every: int, extra: list[str], tmp: Path) -> dict:
    run_dir = tmp / f"{layout}-{kind}"
    checkpoint = ["checkpoint=async"] if kind == "async" else []
    overrides = [*BASE, *LAYOUTS[layout], *checkpoint, f"max_steps={steps}", f"eval_every={10 * steps}",
                 f"checkpoint.every={every}", *extra]
    run_effitrain(overrides, run_dir)
    manifests = [json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints").glob("step-*/manifest.json"))]
    resume = subprocess.run([sys.executable, "-m", "effitrain.cli", "resume", str(run_dir), f"max_steps={steps + 1}"],
                            capture_output=True, text=True)
    if resume.returncode != 0:
        raise SystemExit(f"resume failed: {resume.stderr[-2000:]}")
    log = (run_dir / "train.log").read_text()
    load_s = float(re.findall(r"loaded in ([0-9.]+) s", log)[-1])
    verify_s = float(re.findall(r"checksums verified in ([0-9.]+) s", log)[-1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:steps]
    saved = {m["step"] for m in manifests}
    after = [r["step_time_s"] for r in records if r["step"] - 1 in saved]
    others = [r["step_time_s"] for r in records if r["step"] - 1 not in saved and r["step"] > 2]
    return {"layout": layout, "kind": kind, "saves": len(manifests),
            "save_s": statistics.median(m["save_s"] for m in manifests),
            "stall_s": statistics.median(m["stall_s"] for m in manifests),
            "bytes": manifests[-1]["bytes"], "load_s": load_s,
            "hash_s": statistics.median(m["hash_s"] for m in manifests), "verify_s": verify_s,
            "step_s_after_save": statistics.median(after) if after else None,
            "step_s_other": statistics.median(others) if others else None}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--json", default="bench_checkpoint.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts:
            for kind in ("sync", "async"):
                rows.append(one(layout, kind, steps=args.steps, every=args.every, extra=args.overrides, tmp=Path(tmp)))
                print(f"  {layout} {kind}: done", file=sys.stderr, flush=True)
    sync = {r["layout"]: r["save_s"] for r in rows if r["kind"] == "sync"}
    for r in rows:
        r["stall_pct_of_sync_save"] = 100.0 * r["stall_s"] / sync[r["layout"]]
        r["hash_pct_of_sync_save"] = 100.0 * r["hash_s"] / sync[r["layout"]]
        r["verify_pct_of_load"] = 100.0 * r["verify_s"] / r["load_s"]
    print(f"\ncheckpoint cost on {machine()}: {' '.join(BASE + args.overrides)}, {args.steps} steps, "
          f"a save every {args.every}\n")
    print("| layout | kind | MiB on disk | save s | training waited s | % of sync save | checksums on save s | "
          "% of sync save | load s | checksums on load s | % of load | step s after a save | other steps s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['layout']} | {r['kind']} | {r['bytes'] / 2**20:,.0f} | {r['save_s']:.2f} | {r['stall_s']:.2f} | "
              f"{r['stall_pct_of_sync_save']:.0f} | {r['hash_s']:.2f} | {r['hash_pct_of_sync_save']:.1f} | "
              f"{r['load_s']:.2f} | {r['verify_s']:.2f} | {r['verify_pct_of_load']:.1f} | "
              f"{_s(r['step_s_after_save'])} | {_s(r['step_s_other'])} |")
    Path(args.json).write_text(json.dumps({"machine": machine(), "date": datetime.date.today().isoformat(),
                                           "argv": sys.argv, "rows": rows}, indent=2))


def _s(value) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
