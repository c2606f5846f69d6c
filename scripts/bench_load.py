"""Loading a model.pretrained checkpoint: per-rank peak host memory, whole load vs shard by shard, fsdp(2) and tp(2).

    python scripts/bench_load.py [--layouts fsdp tp] [--dtype float32|bfloat16] [--json bench_load.json]

Builds a random-weight llama checkpoint locally (llama-150m's blocks, a 50,304-token vocabulary, untied head:
153M parameters, 611 MB in fp32, saved by save_pretrained in 200 MB safetensors shards, in fp32 or, as released
checkpoints are, in bf16). Each row starts 2 fresh
ranks (torchrun, gloo on CPU, nccl on CUDA) that build the model exactly as `effitrain train` does
(train.build_parts on a start_job) and stop there: no data, no step. Per rank: its resident memory before building
(the baseline: torch, effitrain and the model's transformers modules imported, the process group up), and its
resident high-water mark while building (VmHWM, reset by /proc/self/clear_refs first) less that baseline. "whole" is
model.load_shards=false (every rank loads the whole checkpoint, then shards it: the load before issue 23), "shards"
the default. Target for "shards": peak <= model / W + its largest tensor. On CUDA the parameters live on the GPU,
so host memory falls further than here (on CPU a rank's shards are host memory). Prints a table and writes JSON.

`--worker OUT CONFIGS --check` (under torchrun; tests/test_load.py) also gathers every parameter
(DTensor.full_tensor) and compares it and every buffer with the whole load's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {"fsdp": ["parallel=fsdp"], "tp": ["parallel=tp"], "fsdp-tp": ["parallel=fsdp-tp"],
           "hsdp": ["parallel=hsdp", "parallel.dp_replicate=2"]}
MODES = {"whole": ["model.load_shards=false"], "shards": []}
MB = 1e6


def build_checkpoint(out: Path, *, dtype: str = "float32", vocab: int = 50_304, shard: str = "200MB") -> dict:
    """A random llama checkpoint of llama-150m's blocks, stored in `dtype`; its parameter count, and its bytes and
    largest tensor's bytes in fp32 (the run's parameter dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                         intermediate_size=2048, vocab_size=vocab, max_position_embeddings=2048,
                         tie_word_embeddings=False, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    model.to(getattr(torch, dtype)).save_pretrained(out, max_shard_size=shard)
    return {"params": sum(p.numel() for p in model.parameters()), "bytes": sum(sizes), "largest_bytes": max(sizes)}


def _status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak measured is the build's, not the imports'."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(out: Path, configs: list[list[str]], *, check: bool) -> None:
    """One rank: for each config, build the run's parts as `effitrain train` does; its memory (and the check) to
    OUT.rank<r>.json. One config per launch for a clean measure; several share a launch where only the check counts."""
    import gc
    import logging

    from effitrain.base.distributed import close_world
    from effitrain.compose import compose_one
    from effitrain.engine.hostmem import keep_freed_memory
    from effitrain.engine.job import start_job
    from effitrain.engine.train import build_parts
    from effitrain.model.build import pretrained_on_meta

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("effitrain").addHandler(handler)
    logging.getLogger("effitrain").setLevel(logging.INFO)
    results, rank = [], 0
    for overrides in configs:
        cfg = compose_one(overrides)
        job = start_job(cfg)
        rank = job.world.rank
        if job.world.device.type == "cpu":
            keep_freed_memory(cfg.cpu_keep_freed_memory)  # as the trainer runs
        vocab = json.loads((Path(cfg.model.pretrained) / "config.json").read_text())["vocab_size"]
        # part of the baseline, as both loads pay it: the model's transformers modules imported (~200 MB), by a
        # build of its architecture on the meta device, freed before the measure
        pretrained_on_meta(cfg.model.pretrained)
        gc.collect()
        lines.clear()
        baseline = _status("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        parts = build_parts(cfg, job=job, vocab_size=vocab)
        seconds = time.perf_counter() - start
        result = {"rank": rank, "baseline_bytes": baseline, "peak_bytes": _status("VmHWM") - baseline,
                  "after_bytes": _status("VmRSS") - baseline, "seconds": seconds,
                  "sliced": any("reads its own shards" in line for line in lines), "log": list(lines)}
        if check:
            result["mismatches"] = _mismatches(parts.state.model, cfg, vocab)
        results.append(result)
        del parts
    out.with_suffix(f".rank{rank}.json").write_text(json.dumps(results))
    close_world()


def _mismatches(model, cfg, vocab: int) -> list[str]:
    """The names whose gathered values (and dtype) differ from the whole load's, cast as the run casts them."""
    import torch
    from torch.distributed.tensor import DTensor

    from effitrain.model.build import build_model, canonical_name

    reference = build_model(cfg.model, vocab_size=vocab, max_seq_len=cfg.data.seq_len)
    expected = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    bad = [name for name in expected if name not in
           {canonical_name(n) for n, _ in [*model.named_parameters(), *model.named_buffers()]}]
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        full = value.full_tensor() if isinstance(value, DTensor) else value
        want = expected[canonical_name(name)].to(full.dtype)
        if full.shape != want.shape or not torch.equal(full.cpu(), want):
            bad.append(canonical_name(name))
    return bad


def measure(runs: list[tuple[Path, str, str]], *, tmp: Path, check: bool = False) -> list[list[dict]]:
    """Per (checkpoint, layout, mode) of `runs`, the per-rank results of building it, in one launch of 2 fresh
    ranks."""
    out = tmp / "load.json"
    configs = [[f"model.pretrained={checkpoint}", "launcher.nproc_per_node=2", *LAYOUTS[layout], *MODES[mode]]
               for checkpoint, layout, mode in runs]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", str(out), json.dumps(configs), *(["--check"] if check else [])]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{runs} failed:\n{result.stderr[-3000:]}")
    per_rank = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]
    return [list(ranks) for ranks in zip(*per_rank, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["fsdp", "tp"], choices=list(LAYOUTS))
    parser.add_argument("--json", type=Path, default=Path("bench_load.json"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the checkpoint's stored dtype (the run loads it in fp32 either way)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _effitrain_run import machine

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "llama-153m"
        sizes = build_checkpoint(checkpoint, dtype=args.dtype)
        target = sizes["bytes"] / 2 + sizes["largest_bytes"]
        rows = []
        for layout in args.layouts:
            for mode in MODES:
                for r in measure([(checkpoint, layout, mode)], tmp=tmp)[0]:  # one launch each: a clean baseline
                    rows.append({"layout": layout, "mode": mode, **{k: r[k] for k in
                                 ("rank", "baseline_bytes", "peak_bytes", "after_bytes", "seconds", "sliced")}})
    print(f"{machine()}; checkpoint: {sizes['params'] / 1e6:.0f}M parameters stored in {args.dtype}, "
          f"{sizes['bytes'] / MB:.0f} MB in fp32, "
          f"largest tensor {sizes['largest_bytes'] / MB:.0f} MB; target per rank (shards): "
          f"<= {target / MB:.0f} MB above baseline")
    print(f"{'layout':<7} {'load':<7} {'rank':>4} {'baseline MB':>12} {'peak MB':>8} {'after MB':>9} {'s':>6}")
    for row in rows:
        print(f"{row['layout']:<7} {row['mode']:<7} {row['rank']:>4} {row['baseline_bytes'] / MB:>12.0f} "
              f"{row['peak_bytes'] / MB:>8.0f} {row['after_bytes'] / MB:>9.0f} {row['seconds']:>6.1f}")
    args.json.write_text(json.dumps({"machine": machine(), "checkpoint": sizes, "dtype": args.dtype,
                                     "target_bytes": target, "rows": rows}, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), json.loads(sys.argv[3]), check="--check" in sys.argv[4:])
    else:
        main()
