"""Pipeline parallel's cost: throughput, the measured bubble against the schedule's theoretical one, and peak memory
per stage, for each schedule x microbatches on `--nproc` ranks (CPU: gloo).

    python scripts/bench_pipeline.py [--nproc 2] [--steps 8] [--schedules gpipe 1f1b ...] [--microbatches 2 4 8]
                                     [--splits even cost] [--json bench_pipeline.json] [extra overrides]

Each row is one `effitrain train parallel=pp` in a fresh process group (default: a 4-block llama, d=128, untied
embeddings, 8 sequences x 128 tokens per step, no evaluation). From its metrics.jsonl, medians over the steps after
the first two (warm-up): tokens/s, bubble_pct (1 - the stages' own compute time / the schedule step's wall time,
over the pipeline's ranks: parallel/pipeline.py), and the theoretical bubble (p - 1) / (m + p - 1) for gpipe and
1f1b; compute ms per rank is each pipeline rank's own forward/backward time in a step (stage_busy_ms: what a split
balances); peak memory per stage is each pipeline rank's peak (CPU: the process's peak RSS, interpreter and torch
included). Interleaved / V schedules run 2 stages per rank. A combination the run refuses (zbv with fewer
microbatches than stages) is listed with the one line it gave. `--splits even cost` runs each row under both ways
of cutting the blocks into stages (parallel.split). Prints a table and writes JSON.
"""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _effitrain_run import machine

BASE = ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "model.intermediate_size=512",
        "model.tie_embeddings=false", "data.seq_len=128", "batch_size=8", "eval_batches=1", "checkpoint=off",
        "logging.every=1"]
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble", "zbv")
TWO_PER_RANK = ("interleaved-1f1b", "zero-bubble", "zbv", "looped-bfs", "dualpipev")


def one(schedule: str, microbatches: int, *, split: str, nproc: int, steps: int, extra: list[str], tmp: Path
        ) -> dict:
    run_dir = tmp / f"{schedule}-{microbatches}-{split}"
    overrides = [*BASE, "parallel=pp", f"launcher.nproc_per_node={nproc}", f"parallel.schedule={schedule}",
                 f"parallel.split={split}",
                 f"parallel.microbatches={microbatches}", f"max_steps={steps}", f"eval_every={10 * steps}",
                 f"parallel.stages_per_rank={2 if schedule in TWO_PER_RANK else 1}", *extra]
    proc = subprocess.run([sys.executable, "-m", "effitrain.cli", "train", *overrides, f"hydra.run.dir={run_dir}",
                           "logging.progress=false"], capture_output=True, text=True)
    row = {"schedule": schedule, "microbatches": microbatches, "split": split, "ranks": nproc}
    if proc.returncode == 2:  # refused before launch: the combination is not one the schedule runs
        return row | {"refused": proc.stderr.strip().splitlines()[-1]}
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(overrides)}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:]
    return row | {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
                  "bubble_pct": statistics.median(r["bubble_pct"] for r in records),
                  "bubble_theory_pct": records[-1].get("bubble_theory_pct"),
                  "stage_busy_ms": [statistics.median(r["stage_busy_ms"][i] for r in records)
                                    for i in range(len(records[-1]["stage_busy_ms"]))],
                  "stage_mem_peak_gib": records[-1]["stage_mem_peak_gib"]}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--microbatches", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--splits", nargs="+", default=["even"], choices=["even", "cost"])
    parser.add_argument("--json", default="bench_pipeline.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in args.schedules:
            for m in args.microbatches:
                for split in args.splits:
                    rows.append(one(schedule, m, split=split, nproc=args.nproc, steps=args.steps, extra=args.overrides,
                                    tmp=Path(tmp)))
                    print(f"  {schedule} m={m} split={split}: done", file=sys.stderr, flush=True)
    print(f"\npipeline parallel on {machine()}: {' '.join(BASE + args.overrides)}, {args.nproc} ranks, "
          f"{args.steps} steps (medians of steps 3-{args.steps})\n")
    print("| schedule | microbatches | split | tokens/s | bubble % measured | bubble % theory "
          "| compute ms per rank | peak memory per stage GiB |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        if "refused" in r:
            print(f"| {r['schedule']} | {r['microbatches']} | {r['split']} | refused: {r['refused']} | | | | |")
            continue
        theory = "-" if r["bubble_theory_pct"] is None else f"{r['bubble_theory_pct']:.1f}"
        memory = " / ".join(f"{m:.2f}" for m in r["stage_mem_peak_gib"])
        busy = " / ".join(f"{b:.0f}" for b in r["stage_busy_ms"])
        print(f"| {r['schedule']} | {r['microbatches']} | {r['split']} | {r['tokens_per_s']:,.0f} | "
              f"{r['bubble_pct']:.1f} | {theory} | {busy} | {memory} |")
    Path(args.json).write_text(json.dumps({"machine": machine(), "date": datetime.date.today().isoformat(),
                                           "argv": sys.argv, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
