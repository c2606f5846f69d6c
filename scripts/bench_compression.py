"""Compression options side by side: the same small model, data and steps on CPU, each option against dense fp32.

    python scripts/bench_compression.py [--steps 150] [--seeds N] [--json bench_compression.json] [extra overrides ...]
    python scripts/bench_compression.py --merge ONE_SEED.json ... [--json bench_compression_seeds.json]

Per option: final validation loss of the trained model and of the exported one (adapters merged, fake-quantized
layers converted, shared blocks unshared) and its gap to the dense run's, trainable parameters, optimizer state
bytes, bytes of the exported state dict on disk (torch.save), and CPU inference tokens/s of the exported model
(greedy, no KV cache, a fixed 16-token prompt). Single-process runs train in this process (their models are
inspected); the gradient-compression rows train under ddp(2) through the real CLI and report the bytes each rank
hands to all-reduce per step (dense DDP: every fp32 gradient byte). Baselines:
  - PTQ int8 / int4: the dense run's model quantized after training with the configs QAT targets;
  - distill: the teacher is the dense model trained 3x as many steps, the student the same model as dense;
  - lora: the dense run exported as a pretrained model, fine-tuned on a new corpus (torch's _dynamo/variables
    sources, the dense run's tokenizer): its validation loss there before and after.
Prints a table and writes JSON (and `<json>.partial` after each row). --seeds N (default 1: the table as it was
recorded) runs the whole table per seed and adds each gap's mean and 95% interval over the seeds, every gap taken
to the dense run of its own seed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from _effitrain_run import bench_parser, machine, run_effitrain

MODEL = ["model.hidden_size=64", "model.num_layers=4", "model.num_heads=4", "model.intermediate_size=256",
         "data.vocab_size=1024", "data.seq_len=64", "batch_size=8", "logging.every=10", "logging.progress=false",
         "eval_batches=8"]
NEW_CORPUS = Path(torch.__file__).parent / "_dynamo" / "variables"


def compose(overrides: list[str]):
    from effitrain.compose import compose_one, normalize

    return compose_one(normalize(overrides))


def train(overrides: list[str], run_dir: Path):
    """A trained Trainer (this process, CPU), after the checks `effitrain train` makes."""
    from effitrain.checks import check_all
    from effitrain.engine.train import train_here

    cfg = compose(overrides)
    check_all(cfg)
    return train_here(cfg, run_dir)


def val_loss(trainer, model) -> float:
    from effitrain.engine.loop import evaluate

    return trainer.data.evaluate(trainer.val_batches, loss_of=lambda batches: evaluate(
        model, batches, precision=trainer.precision, device=torch.device("cpu"))[0])["val_loss"]


def optimizer_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def export_bytes(model, path: Path) -> int:
    torch.save(model.state_dict(), path)
    return path.stat().st_size


@torch.no_grad()
def tokens_per_s(model, vocab: int, *, new_tokens: int = 48) -> float:
    model.eval()
    ids = torch.arange(16).remainder(vocab)[None]
    start = time.perf_counter()
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return new_tokens / (time.perf_counter() - start)


def save_hf(trainer, out: Path) -> Path:
    """The trained model as a local HF directory with the run's tokenizer (a teacher, a pretrained model)."""
    model = trainer.state.converters.export(trainer.state.model)
    model.save_pretrained(out)
    shutil.copy(trainer.data.tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def row(name: str, trainer, exported, tmp: Path, **extra) -> dict:
    model = trainer.state.model
    return {"option": name, "val_loss": val_loss(trainer, model), "export_val_loss": val_loss(trainer, exported),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in exported.parameters()),
            "optimizer_state_bytes": optimizer_bytes(trainer.state.optimizer),
            "export_bytes": export_bytes(exported, tmp / f"{name}.pt"),
            "tokens_per_s": tokens_per_s(exported, trainer.data.vocab_size), **extra}


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], steps=150, json_default="bench_compression.json")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run the whole table with N seeds (the first: seed= among the overrides, else the "
                             "config's; then +1, +2...) and report each gap's mean and 95%% interval over them")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="run nothing: merge the JSON of one-seed runs of this script (e.g. run in parallel "
                             "with seed=1234, seed=1235, ...) into the table over seeds, written to --json")
    args = parser.parse_args()
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        steps = {r["steps"] for r in runs}
        if len(steps) != 1:
            raise SystemExit(f"--merge: the runs trained different steps ({sorted(steps)})")
        seeds = [compose([*MODEL, *r["overrides"]]).seed for r in runs]
        write_seeds(args.json, [r["rows"] for r in runs], seeds=seeds, steps=steps.pop(),
                    result={"machine": runs[0]["machine"], "overrides": [r["overrides"] for r in runs]})
        return
    if args.seeds < 1:
        raise SystemExit("--seeds: give 1 or more")
    steps = args.steps
    seeds = seed_list(args.overrides, args.seeds)
    tables = []
    for seed in seeds:
        overrides = args.overrides if seed is None else [*[o for o in args.overrides if not o.startswith("seed=")],
                                                         f"seed={seed}"]
        suffix = "" if seed is None else f".seed{seed}"
        tables.append(one_seed(steps, overrides, Rows(Path(args.json + suffix))))
        print_table(tables[-1], steps=steps, overrides=overrides)
    result = {"machine": machine(), "overrides": args.overrides}
    if len(tables) > 1:
        write_seeds(args.json, tables, seeds=seeds, steps=steps, result=result)
    else:
        Path(args.json).write_text(json.dumps(result | {"steps": steps, "rows": tables[0]}, indent=1))


def write_seeds(path: str, tables: list[list[dict]], *, seeds: list[int], steps: int, result: dict) -> None:
    """The table over seeds (each gap to its own seed's dense run): printed, and written to `path` as JSON."""
    from effitrain.stats import over_tables

    merged = over_tables(tables, name="option", keys=("val_loss", "val_loss_gap_pct", "export_val_loss_gap_pct"))
    print_seeds_table(merged, seeds=seeds, steps=steps)
    Path(path).write_text(json.dumps(result | {"steps": steps, "rows": tables[0], "seeds": seeds, "tables": tables,
                                               "over_seeds": merged}, indent=1))


def seed_list(overrides: list[str], n: int) -> list[int | None]:
    """[None] for one seed as the overrides give it (the table as before); else n consecutive seeds from the
    overrides' seed= or the config's."""
    if n == 1:
        return [None]
    first = compose([*MODEL, *overrides]).seed
    return [first + i for i in range(n)]


def one_seed(steps: int, overrides: list[str], rows: Rows) -> list[dict]:
    """The whole table for one seed: each row's gap is to this seed's dense run."""
    from effitrain.compression.qat import base_config, quantize

    base = [*MODEL, f"max_steps={steps}", f"eval_every={steps}", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = train(base, tmp / "dense")
        dense_model = dense.state.model
        rows.append(row("none (dense fp32)", dense, dense_model, tmp))
        for bits, cfg in (("int8", base_config("int8", weight_dtype="int8")), ("int4", base_config("int4"))):
            rows.append(row(f"PTQ {bits} of dense", dense, quantize(copy.deepcopy(dense_model), cfg), tmp))
        options = {
            "share-layers": ["compression=[share-layers]"],
            "freeze": ["compression=[freeze]"],
            "qat-int8": ["compression=[qat-int8]"],
            "qat-int4": ["compression=[qat-int4]"],
            # fake quantization only in the second half (torchtune's fake_quant_after_n_steps)
            f"qat-int8 from step {steps // 2}": ["compression=[qat-int8]",
                                                 f"compression.qat_int8.start_step={steps // 2}"],
            f"qat-int4 from step {steps // 2}": ["compression=[qat-int4]",
                                                 f"compression.qat_int4.start_step={steps // 2}"],
            "prune-magnitude": ["compression=[prune-magnitude]",
                                f"compression.prune_magnitude.end_step={steps * 3 // 4}"],
            "prune-2of4": ["compression=[prune-2of4]", f"compression.prune_2of4.start_step={steps // 3}"],
        }
        for name, extra in options.items():
            t = train([*base, *extra], tmp / name)
            exported = t.state.converters.export(copy.deepcopy(t.state.model))
            zeros = None
            if name.startswith("prune"):
                from effitrain.compression.masks import prunable
                ws = prunable(exported)
                zeros = sum((w == 0).sum().item() for w in ws) / sum(w.numel() for w in ws)
            rows.append(row(name, t, exported, tmp, sparsity=zeros))
            print(f"  {name}: done", file=sys.stderr, flush=True)

        teacher = train([*MODEL, f"max_steps={3 * steps}", f"eval_every={3 * steps}", *overrides], tmp / "teacher")
        teacher_dir = save_hf(teacher, tmp / "teacher_hf")
        t = train([*base, "compression=[distill]", f"compression.distill.teacher={teacher_dir}"], tmp / "distill")
        rows.append(row("distill (teacher 3x steps)", t, t.state.model, tmp,
                        teacher_val_loss=val_loss(teacher, teacher.state.model)))
        print("  distill: done", file=sys.stderr, flush=True)

        pretrained = save_hf(dense, tmp / "dense_hf")
        new = ["data=text", f"data.paths=[{NEW_CORPUS}]", f"data.tokenizer={pretrained}/tokenizer.json"]
        t = train([*base, *new, "compression=[lora]", f"model.pretrained={pretrained}", "optimizer.lr=3e-3"],
                  tmp / "lora")
        from transformers import AutoModelForCausalLM

        untouched = AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True, dtype=torch.float32)
        rows.append(row("lora (new corpus)", t, t.state.converters.export(copy.deepcopy(t.state.model)), tmp,
                        val_loss_before=val_loss(t, untouched)))
        print("  lora: done", file=sys.stderr, flush=True)

        ddp = ["parallel=ddp", "launcher.nproc_per_node=2"]
        ddp_base = val_loss_of(run_effitrain([*base, *ddp], tmp / "ddp"))
        for name in ("grad-fp16", "grad-powersgd"):
            summary = run_effitrain([*base, *ddp, f"compression=[{name}]"], tmp / f"ddp-{name}")
            sent = [json.loads(line).get("comm_bytes_per_rank") for line in
                    (tmp / f"ddp-{name}" / "metrics.jsonl").read_text().splitlines()]
            rows.append({"option": f"{name} (ddp 2)", "val_loss": val_loss_of(summary), "ddp_dense_val_loss": ddp_base,
                         "comm_bytes_per_rank_last": sent[-1], "comm_bytes_dense": 4 * rows[0]["total_params"]})
            print(f"  {name}: done", file=sys.stderr, flush=True)

    dense_loss = rows[0]["val_loss"]
    for r in rows:
        ref = r.get("ddp_dense_val_loss", dense_loss)
        r["val_loss_gap_pct"] = 100.0 * (r["val_loss"] - ref) / ref
        if "export_val_loss" in r:
            r["export_val_loss_gap_pct"] = 100.0 * (r["export_val_loss"] - dense_loss) / dense_loss
    return list(rows)


def print_seeds_table(merged: list[dict], *, seeds: list[int], steps: int) -> None:
    """Each row's gap to the dense run of the same seed: mean and 95% interval over seeds; 'holds' where the
    interval excludes zero (the sign of the effect is more than seed noise)."""
    print(f"\ncompression bench over seeds {seeds} ({steps} steps): gap vs the same seed's dense run, mean +- 95% "
          "interval\n")
    print("| option | val loss | gap vs dense | excludes 0 | exported gap | excludes 0 |")
    print("| --- | --- | --- | --- | --- | --- |")

    def cell(r, key, spec, unit=""):
        mean, half = r[f"{key}_mean"], r[f"{key}_ci95"]
        return "-" if mean is None else f"{mean:{spec}}" + ("" if half is None else f" +- {half:.2f}") + unit

    def holds(r, key):
        mean, half = r[f"{key}_mean"], r[f"{key}_ci95"]
        return "-" if mean is None or half is None or half == 0 else ("yes" if abs(mean) > half else "no")

    for r in merged:
        print(f"| {r['option']} | {cell(r, 'val_loss', '.4f')} | {cell(r, 'val_loss_gap_pct', '+.2f', '%')} | "
              f"{holds(r, 'val_loss_gap_pct')} | {cell(r, 'export_val_loss_gap_pct', '+.2f', '%')} | "
              f"{holds(r, 'export_val_loss_gap_pct')} |")


class Rows(list):
    """The table so far, rewritten to `<json>.partial` after every row: a run that fails or hangs keeps the rest."""

    def __init__(self, path: Path):
        super().__init__()
        self.partial = path.with_suffix(path.suffix + ".partial")

    def append(self, row: dict) -> None:
        super().append(row)
        self.partial.write_text(json.dumps(list(self), indent=1))


def val_loss_of(summary: dict) -> float:
    return summary["final_val_loss"]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], *, steps: int, overrides: list[str]) -> None:
    print(f"\ncompression bench: {machine()}, {steps} steps, overrides {overrides or 'none'}\n")
    print("| option | val loss | gap vs dense | exported val loss | gap | trainable params | optimizer state | "
          "export bytes | tokens/s (export) | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        notes = []
        if r.get("sparsity") is not None:
            notes.append(f"sparsity {r['sparsity']:.3f}")
        if "teacher_val_loss" in r:
            notes.append(f"teacher val loss {r['teacher_val_loss']:.4f}")
        if "val_loss_before" in r:
            notes.append(f"new-corpus val loss before {r['val_loss_before']:.4f}; "
                         f"trains {100 * r['trainable_params'] / r['total_params']:.2f}% of params")
        if "comm_bytes_per_rank_last" in r:
            notes.append(f"sends {r['comm_bytes_per_rank_last']:,} B/step/rank vs dense {r['comm_bytes_dense']:,} "
                         f"({r['comm_bytes_per_rank_last'] / r['comm_bytes_dense']:.3f}x); gap vs ddp dense")
        print(f"| {r['option']} | {r['val_loss']:.4f} | {r['val_loss_gap_pct']:+.2f}% | "
              f"{_fmt(r.get('export_val_loss'), '.4f')} | {_fmt(r.get('export_val_loss_gap_pct'), '+.2f')}% | "
              f"{_fmt(r.get('trainable_params'), ',')} | {_fmt(r.get('optimizer_state_bytes'), ',')} | "
              f"{_fmt(r.get('export_bytes'), ',')} | {_fmt(r.get('tokens_per_s'), '.0f')} | {'; '.join(notes)} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
