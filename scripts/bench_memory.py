"""Memory per rank by parallel layout, and activation checkpointing's effect on peak memory.

1. Exact bytes this rank holds of parameters, gradients and optimizer state (from the local shards, after
   one AdamW step) for single, ddp, fsdp, fsdp-zero2 and tp, each multi-rank layout at world size 2 through
   torch's elastic agent (gloo on CPU, nccl on CUDA).
2. Peak memory of one forward+backward of a 12-layer model with activation checkpointing none vs full:
   CUDA allocator peak on a GPU, else the process's peak RSS (each mode in a fresh process).

    python scripts/bench_memory.py [--model llama-20m] [--json bench_memory.json]

Prints two tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MiB = 2**20


def _cfg(*overrides: str):
    from effitrain.compose import compose_one

    return compose_one(list(overrides))


def _local_bytes(t) -> int:
    t = getattr(t, "_local_tensor", t)  # a DTensor: only this rank's shard
    return t.numel() * t.element_size()


def _build(cfg, job):
    """The model and optimizer exactly as `effitrain train` builds them (converters, layout, init, optimizer)."""
    from effitrain.engine.runtime import seed_everything
    from effitrain.engine.train import build_parts

    seed_everything(cfg.seed)
    state = build_parts(cfg, job=job, vocab_size=cfg.data.vocab_size).state
    return state.model, state.optimizer


def _step(model, optimizer, cfg, job, *, zero_grad: bool = False) -> None:
    import torch

    from effitrain.engine.loop import lm_loss

    # the ranks of one tensor-parallel group must see the same batch
    gen = torch.Generator().manual_seed(job.shard.rank)
    batch = torch.randint(0, cfg.data.vocab_size, (cfg.batch_size, cfg.data.seq_len + 1), generator=gen)
    lm_loss(model, batch.to(job.world.device)).backward()
    optimizer.step()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)


def state_bytes(overrides: list[str]) -> dict:
    """One worker: build the layout, take one step, count the local bytes (keeping the gradients)."""
    from effitrain.base.distributed import close_world
    from effitrain.engine.job import start_job

    cfg = _cfg(*overrides)
    job = start_job(cfg)
    model, optimizer = _build(cfg, job)
    _step(model, optimizer, cfg, job)
    params = list(model.parameters())
    result = {"rank": job.world.rank,
              "params_mib": sum(_local_bytes(p) for p in params) / MiB,
              "grads_mib": sum(_local_bytes(p.grad) for p in params if p.grad is not None) / MiB,
              "optim_mib": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                               if hasattr(v, "numel") and v.dim() > 0) / MiB}
    result["total_mib"] = result["params_mib"] + result["grads_mib"] + result["optim_mib"]
    close_world()
    return result


def run_layout(layout: str, overrides: list[str], nproc: int) -> dict:
    """Rank 0's numbers (every rank holds the same amount in these layouts)."""
    if nproc == 1:
        return state_bytes([*overrides, f"parallel={layout}"])
    import uuid

    import torch
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          start_method="spawn" if torch.cuda.is_available() else "fork")
    results = elastic_launch(config, state_bytes)([*overrides, f"parallel={layout}"])
    return results[0]


def peak_for_ac(mode: str, overrides: list[str]) -> dict:
    """Peak memory of forward+backward with activation checkpointing `mode` (run in a fresh process)."""
    from effitrain.engine.job import start_job
    from effitrain.logging.metrics import MemoryMeter

    cfg = _cfg(*overrides, f"parallel.activation_checkpointing={mode}")
    job = start_job(cfg)
    world = job.world
    model, optimizer = _build(cfg, job)
    _step(model, optimizer, cfg, job, zero_grad=True)  # warm-up: optimizer state exists, grads freed
    meter = MemoryMeter(world.device)
    before = meter.peaks_gib()[0] if world.device.type != "cuda" else 0.0
    meter.reset()
    _step(model, optimizer, cfg, job, zero_grad=True)
    active, reserved = meter.peaks_gib()
    return {"ac": mode, "device": str(world.device), "peak_active_mib": active * 1024,
            "peak_reserved_mib": reserved * 1024, "measure": "cuda allocator" if world.device.type == "cuda"
            else f"peak RSS (VmHWM; {before * 1024:.0f} MiB before the step)"}


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-20m", help="model option for the state-bytes table")
    parser.add_argument("--json", default="bench_memory.json")
    parser.add_argument("--ac-worker", help=argparse.SUPPRESS)  # internal: one AC measurement in this process
    args = parser.parse_args()
    ac_overrides = ["model=llama-20m", "model.num_layers=12", "model.hidden_size=256", "model.num_heads=4",
                    "model.intermediate_size=688", "data.seq_len=512", "batch_size=8", "data.vocab_size=4096"]
    if args.ac_worker:
        print(json.dumps(peak_for_ac(args.ac_worker, ac_overrides)))
        return

    base = [f"model={args.model}", "batch_size=2", "data.seq_len=64", "data.vocab_size=4096"]
    rows = []
    for layout, nproc in (("single", 1), ("ddp", 2), ("fsdp", 2), ("fsdp-zero2", 2), ("tp", 2)):
        rows.append({"layout": layout, "world": nproc, **run_layout(layout, base, nproc)})
    ddp = next(r for r in rows if r["layout"] == "ddp")["total_mib"]
    for r in rows:
        r["vs_ddp"] = r["total_mib"] / ddp
    print(f"## state per rank, model={args.model} (MiB, exact from local shards after one AdamW step)")
    print(_table(rows, ["layout", "world", "params_mib", "grads_mib", "optim_mib", "total_mib", "vs_ddp"]))

    ac_rows = []
    for mode in ("none", "full"):
        out = subprocess.run([sys.executable, __file__, "--ac-worker", mode], capture_output=True, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
        ac_rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n## peak memory of one step, 12 layers d=256, batch 8 x 512 tokens (MiB)")
    print(_table(ac_rows, ["ac", "device", "peak_active_mib", "peak_reserved_mib", "measure"]))
    Path(args.json).write_text(json.dumps({"state_bytes": rows, "activation_checkpointing": ac_rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
