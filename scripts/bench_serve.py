"""What serving each trained variant costs, beside its quality: `effitrain serve-cost` over exports of
bench_compression's model on the CPU.

    python scripts/bench_serve.py [--steps 150] [--seeds 1] [--batch 1,8] [--prompt 32] [--gen 32] [--repeats 5]
                                  [--compile off|on|both] [--threads 1] [--no-qat] [--json bench_serve.json]
                                  [--plot bench_serve.png] [extra overrides ...]

Trains the dense model (bench_compression's MODEL) and, unless --no-qat, the same with compression=[qat-int8], through
the real CLI; exports them (`effitrain export`: fp32, --dtype bf16, --quantize int8, --quantize int4; the QAT run as
it exports); measures each with serve-cost's own code (plus the fp32 export with `--quant int8`, torchao's int8
weight-only kernel applied at load). Quality is each served model's own validation loss on the run's validation
batches (the quantized ones included, which serve-cost alone cannot know), so the table shows what a compression
costs in loss beside what it buys in speed and bytes. Prints serve-cost's tables and writes its JSON and plot.
--seeds N trains and exports every variant with N seeds (bench_compression's seed_list): the quality column is the
mean over them, with its 95% interval and each variant's gap to the dense fp32 export of the same seed; serving is
measured on the first seed's exports (the seed changes the weights' values, not what serving them costs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from _effitrain_run import machine, run_effitrain
from bench_compression import MODEL, seed_list


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, default=1, help="quality over N seeds (mean and 95%% interval)")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt", default="32")
    p.add_argument("--gen", default="32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", default="off", choices=("off", "on", "both"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while measuring (1: steadier numbers on a CPU other processes share)")
    p.add_argument("--no-qat", action="store_true", help="leave out the QAT int8 run (one training run fewer)")
    p.add_argument("--json", default="bench_serve.json")
    p.add_argument("--plot", default="bench_serve.png")
    p.add_argument("overrides", nargs="*", help="extra effitrain overrides for every run")
    return p.parse_args()


def variants(tmp: Path, args, overrides: list[str]) -> list[tuple[str, Path, dict]]:
    """(name, export directory, serve-cost settings changes) of each variant, after training and exporting them."""
    from effitrain.engine.export import export_run

    tmp.mkdir(parents=True, exist_ok=True)
    base = [*MODEL, f"max_steps={args.steps}", f"eval_every={args.steps}", *overrides]
    run_effitrain(base, tmp / "dense")
    out = [("dense fp32", export_run(tmp / "dense", out=tmp / "fp32"), {}),
           ("dense bf16", export_run(tmp / "dense", out=tmp / "bf16", dtype="bf16"), {}),
           ("int8 weight-only at load", tmp / "fp32", {"quant": "int8"}),
           ("PTQ int8 (dyn. act.)", export_run(tmp / "dense", out=tmp / "ptq-int8", quantize="int8"), {}),
           ("PTQ int4 (unpacked)", export_run(tmp / "dense", out=tmp / "ptq-int4", quantize="int4"), {})]
    if not args.no_qat:
        run_effitrain([*base, "compression=[qat-int8]"], tmp / "qat")
        out.append(("QAT int8", export_run(tmp / "qat", out=tmp / "qat-int8"), {}))
    print("  trained and exported", file=sys.stderr, flush=True)
    return out


class Quality:
    """Validation loss of a loaded model on the dense run's validation batches (as `effitrain eval` computes it)."""

    def __init__(self, export: Path, overrides: list[str]):
        import torch

        from effitrain.compose import compose_one, normalize
        from effitrain.data.loader import Shard
        from effitrain.data.mix import prepare_run_data
        from effitrain.precision.build import build_precision

        cfg = compose_one(normalize([*MODEL, *overrides, f"data.tokenizer={export / 'tokenizer.json'}",
                                     f"model.pretrained={export}"]))
        self.data = prepare_run_data(cfg.data)
        self.sets = self.data.validation(seq_len=cfg.data.seq_len, batch_size=cfg.batch_size,
                                         num_batches=cfg.eval_batches, shard=Shard())
        self.precision = build_precision(cfg.precision, device=torch.device("cpu"))

    def __call__(self, model) -> float:
        import torch

        from effitrain.engine.loop import evaluate

        scored = _Fp32Logits(model)
        with torch.no_grad():
            return self.data.evaluate(self.sets, loss_of=lambda b: evaluate(
                scored, b, precision=self.precision, device=torch.device("cpu"))[0])["val_loss"]


def quality_over_seeds(scores: dict[str, list[float]], name: str) -> dict:
    """A variant's quality fields: its mean val loss over the seeds (what the table and the Pareto front use), the
    95% interval, and its gap to the dense fp32 export of the same seed (mean and interval, in %)."""
    from effitrain.stats import mean_interval

    losses, dense = scores[name], scores["dense fp32"]
    mean, half = mean_interval(losses)
    gap, gap_half = mean_interval([100.0 * (a - b) / b for a, b in zip(losses, dense, strict=True)])
    return {"quality": mean, "quality_ci95": half, "quality_per_seed": losses, "quality_gap_pct": gap,
            "quality_gap_ci95": gap_half,
            "quality_source": f"val_loss of the served model, mean over {len(losses)} seed(s)"}


def print_quality(models: list[dict], *, seeds: list) -> None:
    print(f"\nquality over seeds {seeds}: val loss and gap to the same seed's dense fp32 export, mean +- 95% "
          "interval\n")
    print("| model | val loss | gap vs dense fp32 | excludes 0 |")
    print("| --- | --- | --- | --- |")
    for m in models:
        half = m["quality_gap_ci95"]
        holds = "-" if not half else ("yes" if abs(m["quality_gap_pct"]) > half else "no")
        print(f"| {m['model']} | {m['quality']:.4f} +- {m['quality_ci95']:.4f} | {m['quality_gap_pct']:+.2f} +- "
              f"{half:.2f}% | {holds} |")


def _Fp32Logits(model):
    """The model with its logits cast to fp32 before the loss: a bf16 model's cross entropy computed in bf16 read
    0.02 nats lower than the fp32 model's on the same weights (rounding of the log-softmax and the mean), which would
    put bf16 ahead on quality for no reason of its own."""
    from types import SimpleNamespace

    import torch

    class Scored(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids):
            return SimpleNamespace(logits=self.inner(input_ids=input_ids).logits.float())

    return Scored()


def main() -> None:
    from effitrain.commands import serve_cost as sc

    args = parse()
    settings = sc.Settings(batches=sc._ints(args.batch), prompts=sc._ints(args.prompt), gens=sc._ints(args.gen),
                           repeats=args.repeats, compiles=sc._choice("compile", args.compile))
    sc.check_settings(settings)
    import torch

    torch.set_num_threads(args.threads)  # the training runs are processes of their own: this is the measuring
    rows, models = [], []
    seeds = seed_list(args.overrides, args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made, scores = {}, {}  # per seed: the variants; per variant: its val loss at each seed
        for seed in seeds:
            overrides = args.overrides if seed is None else [*[o for o in args.overrides if not o.startswith("seed=")],
                                                             f"seed={seed}"]
            made[seed] = variants(tmp / f"seed-{seed}", args, overrides)
            quality = Quality(tmp / f"seed-{seed}" / "fp32", overrides)
            for name, path, change in made[seed]:
                scores.setdefault(name, []).append(quality(sc.load_model(path, replace(settings, **change)).model))
            print(f"  seed {seed}: scored", file=sys.stderr, flush=True)
        for name, path, change in made[seeds[0]]:
            loaded = sc.load_model(path, replace(settings, **change))
            loaded.info |= {"model": name, "path": path.name} | quality_over_seeds(scores, name)
            models.append(loaded.info)
            rows += sc.measure_model(loaded, replace(settings, **change))
            print(f"  {name}: measured", file=sys.stderr, flush=True)
    summaries = sc.with_serving_mfu(sc.compare_rows(models, rows))
    print(f"\nserve-cost bench: {machine()}, {args.steps} training steps, overrides {args.overrides or 'none'}")
    print(sc.format_tables(models, rows, summaries, settings))
    if len(seeds) > 1:
        print_quality(models, seeds=seeds)
    Path(args.json).write_text(json.dumps({"machine": machine(), "steps": args.steps, "argv": sys.argv[1:],
                                           "rows": rows, "models": summaries}, indent=1))
    sc.plot(summaries, Path(args.plot))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
