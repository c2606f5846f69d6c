"""effitrain side by side with what users would otherwise pick: the same work, run interleaved, medians.

    pip install -e ".[bench]"
    python scripts/bench_peers.py                      # default model, 3 rounds x 6 runs
    python scripts/bench_peers.py --rounds 5 --steps 30 --model llama-20m --batch-size 16

Variants, each a fresh subprocess, run interleaved (a g b c d e, a g b c d e, ...):
  a  a minimal hand-written PyTorch loop (forward, loss, backward, clip, AdamW step, lr schedule): the floor.
     On CPU it keeps freed memory in the heap as effitrain's CPU runs do (`effitrain.engine.hostmem.keep_freed_memory`,
     the top-level key cpu_keep_freed_memory), so b/a measures the loop, not the allocator
  g  the same hand loop with glibc's default allocator settings (CPU only; on CUDA g would repeat a): a/g is what
     the heap setting gives a plain loop, b/g what a user gets from effitrain over a loop written without it
  b  `effitrain train` with the identical config
  c  transformers' Trainer with the identical config
  d  `effitrain train +experiment=<preset>`: effitrain's fastest settings for the device (fast-cpu / fast-gpu)
  e  Trainer's fastest settings: torch_compile=True, optim=adamw_torch_fused, loss logged every 10 steps
     (on CUDA also bf16=True and tf32=True, as the fast-gpu preset d)

The same work: one initial checkpoint (saved once, loaded by every variant: effitrain via model.pretrained),
the same token windows in the same order (effitrain's sampler; a, g and c get the identical batches as tensors),
batch x seq_len, fp32, AdamW (lr, betas, eps, weight decay on all but biases and norm weights, foreach on CPU),
warmup + cosine to min_lr via transformers' get_scheduler, grad-norm clipping, number of steps. Final losses of
a, g, b and c must agree (a, g and b to the bit); the script exits 1 when they do not.

One probe times every variant: a global optimizer step post-hook stamps the end of each optimizer step, and a
step's time is the interval between consecutive stamps, so it holds all a framework does per step (data, forward,
backward, clipping, optimizer, schedule, logging). tokens/s of a run = tokens per step / median step time over the
steps after warm-up; a variant's figure is the median over rounds, and each ratio is the median of the per-round
ratios (runs next to each other in time share the machine's noise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _effitrain_run import machine

VARIANTS = {
    "a": "hand-written PyTorch loop (heap kept, as effitrain)",
    "g": "hand-written PyTorch loop (glibc default heap)",
    "b": "effitrain train",
    "c": "transformers Trainer",
    "d": "effitrain train +experiment={preset}",
    "e": "Trainer torch_compile + fused AdamW",
}
# (numerator, denominator, target)
RATIOS = (("b", "a", 0.97), ("b", "g", None), ("a", "g", None), ("b", "c", None), ("d", "e", 1.2))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="effitrain model option (default: the default model)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=6, help="first steps left out of the medians (compile, warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every variant")
    p.add_argument("--variants", default="agbcde", help="which variants, in run order (g is dropped on CUDA)")
    p.add_argument("--preset", default=None, help="effitrain preset for d (default: fast-cpu, or fast-gpu on CUDA)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--loss-rtol", type=float, default=1e-4, help="tolerance on final losses of a, b, c")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: outputs/bench/peers-<time>)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant from --spec
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- the parent


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args.child, json.loads(args.spec.read_text()))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("fast-gpu" if device == "cuda" else "fast-cpu")
    if device == "cuda" and "g" in args.variants:  # effitrain sets no host allocator on CUDA: g would be a again
        args.variants = args.variants.replace("g", "")
    out = (args.out or Path("outputs/bench") / f"peers-{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = prepare(args, out, device=device, preset=preset)
    (out / "spec.json").write_text(json.dumps(spec, indent=2))

    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    t0 = time.perf_counter()
    for r in range(1, args.rounds + 1):
        for v in args.variants:
            result = run_variant(v, round_=r, out=out)
            runs[v].append(result)
            print(f"round {r}/{args.rounds} {v} {VARIANTS[v].format(preset=preset):<40} "
                  f"{result['tokens_per_s']:>10,.0f} tok/s  final loss {result['final_loss']:.6f}  "
                  f"({result['wall_s']:.0f} s)", flush=True)
    report = summarize(runs, args=args, spec=spec, preset=preset, wall_s=time.perf_counter() - t0)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nJSON: {out / 'results.json'}")
    return 0 if report["losses_agree"] else 1


def prepare(args, out: Path, *, device: str, preset: str) -> dict:
    """Compose effitrain's config, open its token cache, save the shared initial checkpoint and the batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from effitrain.compose import compose_all
    from effitrain.data.loader import Shard, TrainBatches, WindowSampler
    from effitrain.data.prepare import prepare_data
    from effitrain.model.build import hf_config

    base = [f"model={args.model}", f"seed={args.seed}", f"max_steps={args.steps}", f"batch_size={args.batch_size}",
            f"data.seq_len={args.seq_len}", "precision=fp32", "optimizer=adamw", "schedule=cosine",
            # Trainer's and the hand loop's convention (decay all but biases and norm weights), set in effitrain's
            # config rather than bending the others
            "optimizer.no_decay=[bias,norm]", f"device={device}"]
    cfg = next(compose_all(base))
    # warm-up longer than the run is clamped differently by different schedulers: keep it inside the run
    base.append(f"schedule.warmup_steps={min(cfg.schedule.warmup_steps, args.steps // 2)}")
    cfg = next(compose_all(base))
    data = prepare_data(cfg.data)
    vocab = data.tokens.vocab_size
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(hf_config(cfg.model, vocab_size=vocab, max_seq_len=args.seq_len),
                                             attn_implementation="sdpa", dtype=torch.float32)
    model.save_pretrained(out / "init")
    batches = TrainBatches(WindowSampler(data.tokens.train, seq_len=args.seq_len, seed=args.seed),
                           batch_size=args.batch_size, grad_accum_steps=1, shard=Shard())
    torch.save(torch.stack([batches.get(step, 0) for step in range(args.steps)]), out / "batches.pt")
    effitrain = base + [f"model.pretrained={out / 'init'}", "eval_every=100000", "eval_batches=1",
                        "logging.progress=false", f"logging.every={args.steps}"]
    o, s = cfg.optimizer, cfg.schedule
    return {
        "device": device, "preset": preset, "model": args.model, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "tokens_per_step": args.batch_size * args.seq_len, "num_params": sum(p.numel() for p in model.parameters()),
        "init": str(out / "init"), "batches": str(out / "batches.pt"),
        "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
        "warmup_steps": s.warmup_steps, "min_lr_ratio": s.min_lr_ratio, "grad_clip": cfg.grad_clip,
        # what effitrain's b and d do to the host allocator (train.py: CPU runs only); a copies it, g does not
        "keep_freed_memory": bool(cfg.cpu_keep_freed_memory) and device == "cpu",
        "effitrain_overrides": {"b": effitrain, "d": effitrain + [f"+experiment={preset}"]},
    }


def run_variant(variant: str, *, round_: int, out: Path) -> dict:
    name = f"{variant}{round_}"
    result_path = out / f"{name}.json"
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--spec", str(out / "spec.json")],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0 or not result_path.exists():
        sys.exit(f"bench_peers: variant {name} failed (exit {proc.returncode}); see {out / f'{name}.log'}")
    return json.loads(result_path.read_text()) | {"wall_s": time.perf_counter() - t0}


def summarize(runs: dict, *, args, spec: dict, preset: str, wall_s: float) -> dict:
    variants = {v: {"label": VARIANTS[v].format(preset=preset),
                    "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "tokens_per_s": [r["tokens_per_s"] for r in rs],
                    "final_loss": [r["final_loss"] for r in rs], "runs": rs} for v, rs in runs.items()}
    ratios = {}
    for num, den, target in RATIOS:
        if num in runs and den in runs:
            per_round = [n["tokens_per_s"] / d["tokens_per_s"] for n, d in zip(runs[num], runs[den], strict=True)]
            ratios[f"{num}/{den}"] = {"median": statistics.median(per_round), "per_round": per_round,
                                      "target": target}
    # a, g, b and c do the same work in fp32: their final losses must agree (a, g and b bit for bit)
    same = [loss for v in "agbc" if v in runs for r in runs[v] for loss in [r["final_loss"]]]
    spread = (max(same) - min(same)) / abs(min(same)) if same else 0.0
    a_and_b = {r["final_loss"] for v in "agb" if v in runs for r in runs[v]}
    import torch

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "machine": machine(), "torch": torch.__version__, "transformers": _version("transformers"),
            "accelerate": _version("accelerate"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "spec": spec, "variants": variants, "ratios": ratios, "final_loss_rel_spread_abc": spread,
            "a_b_bit_identical": len(a_and_b) <= 1, "losses_agree": spread <= args.loss_rtol and len(a_and_b) <= 1,
            "rounds": args.rounds, "wall_s": wall_s}


def print_table(report: dict) -> None:
    spec = report["spec"]
    print(f"\n{report['machine']} | torch {report['torch']} | transformers {report['transformers']} | "
          f"model {spec['model']} ({spec['num_params'] / 1e6:.2f}M) | {spec['batch_size']} x {spec['seq_len']} "
          f"tokens/step | {spec['steps']} steps ({spec['warmup']} warm-up) | {report['rounds']} rounds")
    print("\n| variant | | median tokens/s | per round | final loss |\n| --- | --- | ---: | --- | --- |")
    for v, r in report["variants"].items():
        per = ", ".join(f"{x:,.0f}" for x in r["tokens_per_s"])
        print(f"| {v} | {r['label']} | {r['median_tokens_per_s']:,.0f} | {per} | {r['final_loss'][0]:.6f} |")
    print("\n| ratio | median of per-round ratios | per round | target |\n| --- | ---: | --- | --- |")
    for name, r in report["ratios"].items():
        target = f">= {r['target']}" + (" met" if r["median"] >= r["target"] else " NOT met") if r["target"] else ""
        print(f"| {name} | {r['median']:.3f} | {', '.join(f'{x:.3f}' for x in r['per_round'])} | {target} |")
    verdict = "agree" if report["losses_agree"] else "DO NOT agree"
    print(f"\nfinal losses of a, g, b, c {verdict}: relative spread {report['final_loss_rel_spread_abc']:.2e}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------ the children


def run_child(name: str, spec: dict) -> int:
    import torch

    stamps: list[float] = []
    # the one probe every variant shares: the end of each optimizer step. On CUDA it waits for the device first:
    # variants that sync at different points (a .item() per step or one per 10) would otherwise stamp host time.
    from torch.optim.optimizer import register_optimizer_step_post_hook

    cuda = spec["device"] == "cuda"

    def stamp(*_):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(stamp)
    out = Path(spec["batches"]).parent
    variant = name[0]
    losses, extra = {"a": hand_loop, "g": hand_loop, "b": effitrain_run, "c": trainer_run, "d": effitrain_run,
                     "e": trainer_run}[variant](variant, spec, out / name)
    if len(stamps) != spec["steps"] or len(losses) != spec["steps"]:
        raise RuntimeError(f"{name}: {len(stamps)} optimizer steps and {len(losses)} losses, not {spec['steps']}")
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][spec["warmup"] - 1:]  # interval k ends step k+2
    result = {"tokens_per_s": spec["tokens_per_step"] / statistics.median(times), "step_times_s": times,
              "final_loss": losses[-1], "losses": losses, "threads": torch.get_num_threads(), **extra}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    return 0


def _batches(spec: dict):
    import torch

    return torch.load(spec["batches"])


def hand_loop(variant: str, spec: dict, workdir: Path) -> tuple[list[float], dict]:
    """The floor: nothing but forward, loss, backward, clip, step, schedule (a: with effitrain's heap setting)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, get_scheduler

    # effitrain sets MKL's reproducible mode at job start (runtime.py); the hand loops do as it does, before torch
    # computes anything, so a, g and b run the same kernels
    from effitrain.engine.runtime import MKL_CBWR

    os.environ.setdefault("MKL_CBWR", MKL_CBWR)
    keep = variant == "a" and spec["keep_freed_memory"]
    if keep:
        from effitrain.engine.hostmem import keep_freed_memory

        keep = keep_freed_memory(True)  # False off glibc: said in the result
    device = torch.device(spec["device"])
    model = AutoModelForCausalLM.from_pretrained(spec["init"], dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": spec["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # biases and norm weights
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"], **impl)
    sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=spec["warmup_steps"],
                          num_training_steps=spec["steps"],
                          scheduler_specific_kwargs={"min_lr_rate": spec["min_lr_ratio"]})
    losses = []
    for batch in _batches(spec):
        batch = batch.to(device)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"], foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    return losses, {"keep_freed_memory": keep}


def effitrain_run(variant: str, spec: dict, workdir: Path) -> tuple[list[float], dict]:
    """`effitrain train ...` exactly as a user types it (the CLI's entry point, in this process)."""
    from effitrain.cli import main as effitrain_main

    argv = ["train", *spec["effitrain_overrides"][variant], f"hydra.run.dir={workdir}"]
    print("effitrain " + " ".join(argv), flush=True)
    rc = effitrain_main(argv)
    if rc:
        raise RuntimeError(f"effitrain exited {rc}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((workdir / "summary.json").read_text())
    return [r["loss"] for r in records], {
        "self_reported_tokens_per_s": summary["median_tokens_per_s"], "startup_s": summary["startup_s"],
        "median_data_wait_pct": summary["median_data_wait_pct"]}


def trainer_run(variant: str, spec: dict, workdir: Path) -> tuple[list[float], dict]:
    """transformers' Trainer configured through its own arguments to do the same work."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    windows = _batches(spec).flatten(0, 1)  # sequential sampling of these rows rebuilds the same batches

    class Windows(Dataset):
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            return {"input_ids": windows[i, :-1], "labels": windows[i, 1:]}

    losses = []

    def lm_loss(outputs, labels, num_items_in_batch=None):  # effitrain's loss: mean CE over the T targets
        loss = F.cross_entropy(outputs.logits.flatten(0, 1), labels.flatten())
        losses.append(loss.detach())
        return loss

    fast = variant == "e"
    cpu = spec["device"] == "cpu"
    model = AutoModelForCausalLM.from_pretrained(spec["init"], dtype=torch.float32, attn_implementation="sdpa")
    args = TrainingArguments(
        output_dir=str(workdir), max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"], adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1], adam_epsilon=spec["eps"], max_grad_norm=spec["grad_clip"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]},
        warmup_steps=spec["warmup_steps"], seed=spec["seed"], train_sampling_strategy="sequential",
        use_cpu=cpu, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0,
        logging_steps=10 if fast else 1,  # c logs every step, as effitrain does; e logs less
        optim="adamw_torch_fused" if fast else "adamw_torch", torch_compile=fast,
        bf16=fast and not cpu, tf32=True if fast and not cpu else None)  # on a GPU e also gets bf16 + TF32, as d
    # c: the identical optimizer implementation (foreach on CPU, fused on CUDA); Trainer's own param groups
    # (decay all but biases and norm weights) match the others'
    impl = {"fused": True} if not cpu else {"foreach": True}
    opt = None if fast else (torch.optim.AdamW, {"lr": spec["lr"], "betas": tuple(spec["betas"]),
                                                 "eps": spec["eps"], **impl})
    trainer = Trainer(model=model, args=args, train_dataset=Windows(), compute_loss_func=lm_loss,
                      optimizer_cls_and_kwargs=opt)
    trainer.train()
    return [loss.item() for loss in losses], {}


if __name__ == "__main__":
    sys.exit(main())
