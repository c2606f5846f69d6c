"""What `effitrain estimate` says of a grid of configs, written as JSON, and two such snapshots compared key by key:
a change that means to move no number (a refactor of the cost models) shows it moved none.

    python scripts/estimate_snapshot.py snapshot OUT.json      # ~1,350 configs: model x precision x layout x
                                                               # optimizer x AC, every compression method, and
                                                               # bench_estimate.py's measured grid and TP grid
    python scripts/estimate_snapshot.py compare BEFORE.json AFTER.json

Each config's memory items, peak and its moment, the moments, the biggest item, FLOPs per token, parameters and
notes; a config the checks refuse is recorded with its one line (compare reports refusals that appear or vanish,
and counts the reworded ones). The compare prints a table and exits 1 when an estimate moved.
"""

from __future__ import annotations

import itertools
import json
import sys

SMALL = ["model.hidden_size=64", "model.num_layers=4", "model.num_heads=4", "model.intermediate_size=256",
         "data.vocab_size=2048", "device=cpu", "batch_size=4", "data.seq_len=64"]
LAYOUTS = (("single", 1), ("ddp", 2), ("fsdp", 2), ("fsdp-zero2", 2), ("hsdp", 4), ("tp", 2), ("fsdp-tp", 4))
FIELDS = ("memory", "peak", "phase", "moments", "biggest", "flops", "params", "notes")


def configs() -> list[list[str]]:
    """Overrides on top of SMALL (a later override wins: bench_estimate's points set their own model and shape)."""
    from bench_estimate import grid as bench_grid
    from bench_estimate import tp_grid

    measured = [point["overrides"] for point in [*bench_grid(False), *tp_grid()]]
    grid = [[model, f"precision={precision}", f"parallel={layout}", f"launcher.nproc_per_node={n}",
             f"optimizer={optimizer}", f"parallel.activation_checkpointing={ac}"]
            for model, precision, (layout, n), optimizer, ac in itertools.product(
                ("model=tiny", "model=gpt2-124m"), ("fp32", "tf32", "bf16", "fp16", "bf16-pure"), LAYOUTS,
                ("adamw", "sgd", "adafactor", "muon", "adamw-8bit", "zero1"), ("none", "full", "selective"))]
    for method in ("freeze", "share-layers", "prune-magnitude", "prune-2of4", "qat-int8", "qat-int4", "grad-fp16",
                   "grad-powersgd", "[qat-int8,grad-fp16]"):
        grid += [["model=tiny", f"compression={method}", f"parallel={layout}", f"launcher.nproc_per_node={n}"]
                 for layout, n in LAYOUTS[:3]]
    return grid + [["model=tiny", "parallel=fsdp", "launcher.nproc_per_node=2", "parallel.offload=cpu"],
                   ["model=tiny", "parallel=fsdp", "launcher.nproc_per_node=2", "parallel.reshard_after_forward=false",
                    "precision=bf16"],
                   ["model=tiny", "parallel=tp", "launcher.nproc_per_node=2", "parallel.sequence_parallel=true"],
                   *measured]


def snapshot(out: str) -> None:
    from effitrain.checks import check_all
    from effitrain.compose import compose_one
    from effitrain.errors import UsageError
    from effitrain.estimate import estimate

    result = {}
    for overrides in configs():
        key = " ".join(overrides)
        cfg = compose_one([*SMALL, *overrides])
        try:
            check_all(cfg)
        except UsageError as e:
            result[key] = {"refused": str(e)}
            continue
        e = estimate(cfg, timing=False)
        result[key] = {"memory": e.memory, "peak": e.peak_bytes, "phase": e.peak_phase, "moments": e.moments,
                       "biggest": e.biggest, "flops": e.flops_per_token, "params": e.num_params, "notes": e.notes}
    with open(out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"{sum('refused' not in v for v in result.values())} estimates, "
          f"{sum('refused' in v for v in result.values())} refusals -> {out}")


def compare(before_file: str, after_file: str) -> int:
    with open(before_file) as f:
        before = json.load(f)
    with open(after_file) as f:
        after = json.load(f)
    moved, refusals, reworded = [], [], 0
    for key, old in before.items():
        new = after.get(key, {"missing": True})
        if ("refused" in old) != ("refused" in new):
            refusals.append(key)
        elif "refused" in old:
            reworded += old["refused"] != new["refused"]
        elif any(old[f] != new.get(f) for f in FIELDS):
            moved.append(key)
    print(f"{'configs':<34}{len(before):>8}\n{'estimates moved':<34}{len(moved):>8}\n"
          f"{'refusals appeared or vanished':<34}{len(refusals):>8}\n{'refusals reworded':<34}{reworded:>8}")
    for key in moved + refusals:
        print(f"  {key}")
    return 1 if moved or refusals else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "snapshot":
        snapshot(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
