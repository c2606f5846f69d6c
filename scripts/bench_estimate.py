"""`effitrain estimate` against reality: the estimated peak memory per rank vs the measured one, over a grid.

The configs run in fresh processes (one process for the single-process ones, 2 gloo ranks through torchrun for
ddp, fsdp and tp) that build the model, optimizer and layout exactly as `effitrain train` does (train.build_parts) and
run 6 optimizer steps of random tokens (loop.train_step). The measure is allocator-level, not RSS: the torch
profiler's memory events (`profile_memory=True`) record every CPU allocation and free with the running total of
bytes allocated while it records; one profiler session spans all configs of a process, and a config's peak is the
highest total in its steps 4-6 (steady-state steps: optimizer state exists, zero_grad freed the gradients) less
the total just before its build began, plus the weights transformers left as views of a memory-mapped
.safetensors file (a LoRA base, a teacher: no allocator event records them), compared with the estimate's peak
(the max over ranks). The running total counts frees made on every thread (c10's
`caffe2_report_cpu_memory_usage` flag, set in each worker): gloo's worker threads free the tensors of finished
collectives, and without the flag the total never dropped by them. On CUDA: the allocator's own peak
(torch.cuda.max_memory_allocated) over steps 4-6. `--launches N` launches the multi-rank configs N times
(default 1) and a row compares with the highest of its peaks, the lowest reported beside it: how repeatable the
measure is.

    python scripts/bench_estimate.py [--quick | --compression | --tp | --pp | --ep | --families]
        [--json bench_estimate.json]
        [--md FILE]
        [--only KEY=VALUE,...] [--alone N] [--launches N]

Grid: 2 model sizes x batch x seq x AC none/full x single/ddp/fsdp(2) x fp32/bf16 (--quick: a subset; --tp: tp(2)
with sequence parallel off/on x batch x seq x AC x precision at d128-L4;
--compression: the d128-L4 model under each compression method that changes memory -- freeze, share-layers,
prune-magnitude, LoRA and distill from a model directory made here, PowerSGD under ddp(2) -- single and fsdp(2)
where the method runs there; --pp: pipeline parallel, pp(2) under gpipe and 1f1b at 2 and 4 microbatches x (batch,
seq), the multi-stage schedules (interleaved-1f1b, zero-bubble, zbv), pp(2) x fsdp(2) on 4 ranks (one stage per rank;
two under interleaved-1f1b and zbv) and pp(2) split by cost, the d128-L4
model untied in fp32, each compared at its worst pipeline rank (the estimate's too); --ep: expert parallel,
parallel.ep=2 under ddp(2) and fsdp(2) on the qwen3_moe checkpoint below; --families: a checkpoint of each
transformers family of FAMILY_CONFIGS -- llama, qwen3, gemma3, phi3, olmo2, qwen3-moe, mixtral -- as
model.pretrained, AC none/full). Prints a table (estimated, measured,
error) and writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from effitrain.engine.memprobe import measure, nproc_of

MiB = 2**20
MODELS = {  # two small llama sizes (no data build: the vocabulary is data.vocab_size)
    "d64-L2": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=256"],
    "d128-L4": ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "model.intermediate_size=384"],
}
SHAPES = [(4, 64), (8, 128)]  # (batch, seq)
LAYOUTS = {"single": ["parallel=single"], "ddp": ["parallel=ddp", "launcher.nproc_per_node=2"],
           "fsdp": ["parallel=fsdp", "launcher.nproc_per_node=2"]}


def grid(quick: bool):
    models = list(MODELS) if not quick else ["d64-L2"]
    for model, (batch, seq), ac, layout, precision in itertools.product(
            models, SHAPES, ("none", "full"), LAYOUTS, ("fp32", "bf16")):
        if quick and (batch, seq) != SHAPES[0] and layout != "single":
            continue
        overrides = [*MODELS[model], f"batch_size={batch}", f"data.seq_len={seq}", "data.vocab_size=2048",
                     f"parallel.activation_checkpointing={ac}", *LAYOUTS[layout], f"precision={precision}",
                     "device=cpu"]
        yield {"model": model, "batch": batch, "seq": seq, "ac": ac, "layout": layout, "precision": precision,
               "overrides": overrides}


def tp_grid():
    """Tensor parallel over 2 ranks, with and without sequence parallel: the d128-L4 model (4 heads, MLP 384 split
    in two) x (batch, seq) x AC none/full x fp32/bf16."""
    for (batch, seq), ac, sp, precision in itertools.product(SHAPES, ("none", "full"), (False, True),
                                                             ("fp32", "bf16")):
        layout = "tp+sp" if sp else "tp"
        overrides = [*MODELS["d128-L4"], f"batch_size={batch}", f"data.seq_len={seq}", "data.vocab_size=2048",
                     f"parallel.activation_checkpointing={ac}", "parallel=tp", "launcher.nproc_per_node=2",
                     f"parallel.sequence_parallel={str(sp).lower()}", f"precision={precision}", "device=cpu"]
        yield {"model": "d128-L4", "batch": batch, "seq": seq, "ac": ac, "layout": layout, "precision": precision,
               "overrides": overrides}


PIPELINES = [("pp", 2, "gpipe", 1), ("pp", 2, "1f1b", 1)]  # (layout, ranks, schedule, stages per rank)


def pp_grid():
    """Pipeline parallel: the d128-L4 model (untied: pipelines refuse tied embeddings) in fp32 (what they run),
    pp(2) under gpipe and 1f1b at 2 and 4 microbatches x (batch, seq); the multi-stage schedules (2 stages per rank)
    and pp(2) x fsdp(2) on 4 ranks at batch 4 x 64."""
    points = [(layout, ranks, schedule, spr, m, batch, seq, ()) for (layout, ranks, schedule, spr), m, (batch, seq)
              in itertools.product(PIPELINES, (2, 4), SHAPES)]
    points += [("pp", 2, schedule, 2, 4, *SHAPES[0], ()) for schedule in ("interleaved-1f1b", "zero-bubble", "zbv")]
    points += [("pp-fsdp", 4, "1f1b", 1, 2, *SHAPES[0], ())]
    # several stages per rank under FSDP (each stage a root of its own), and the blocks split by cost
    points += [("pp-fsdp", 4, "interleaved-1f1b", 2, 4, *SHAPES[0], ()),
               ("pp-fsdp", 4, "zbv", 2, 4, *SHAPES[0], ("parallel.reshard_after_forward=false",)),
               ("pp", 2, "1f1b", 1, 4, *SHAPES[0], ("parallel.split=cost",))]
    for layout, ranks, schedule, spr, m, batch, seq, extra in points:
        overrides = [*MODELS["d128-L4"], "model.tie_embeddings=false", f"batch_size={batch}", f"data.seq_len={seq}",
                     "data.vocab_size=2048", f"parallel={layout}", f"launcher.nproc_per_node={ranks}",
                     f"parallel.schedule={schedule}", f"parallel.stages_per_rank={spr}", f"parallel.microbatches={m}",
                     "precision=fp32", "device=cpu", *extra]
        label = " ".join([f"{layout}({ranks}) {schedule} m{m}", *(e.removeprefix("parallel.") for e in extra)])
        yield {"model": "d128-L4", "batch": batch, "seq": seq, "ac": "none", "layout": label, "precision": "fp32",
               "overrides": overrides}


def ep_grid(tmp: Path):
    """Expert parallel: the qwen3_moe checkpoint of FAMILY_CONFIGS (8 experts per layer) with parallel.ep=2 under
    ddp and fsdp on 2 ranks (each holds 4 of the 8 experts), batch 4 x seq 128, fp32."""
    path = family_dir(tmp / "qwen3_moe", "qwen3_moe", vocab=2048)
    for layout in ("ddp", "fsdp"):
        overrides = [f"model.pretrained={path}", f"data.tokenizer={path / 'tokenizer.json'}", "batch_size=4",
                     "data.vocab_size=2048", "data.seq_len=128", *LAYOUTS[layout], "parallel.ep=2", "precision=fp32",
                     "device=cpu"]
        yield {"model": "qwen3_moe", "batch": 4, "seq": 128, "ac": "none", "layout": f"{layout}(2) ep2",
               "precision": "fp32", "overrides": overrides}


def compression_grid(tmp: Path):
    """The d128-L4 model (batch 4, seq 128, fp32) under each compression method that changes memory."""
    hf = hf_model_dir(tmp / "hf", MODELS["d128-L4"], vocab=2048)
    methods = {"freeze": ["compression=[freeze]"], "share-layers": ["compression=[share-layers]"],
               "prune-magnitude": ["compression=[prune-magnitude]", "compression.prune_magnitude.start_step=1",
                                   "compression.prune_magnitude.end_step=2", "compression.prune_magnitude.frequency=1",
                                   "max_steps=10"],
               "lora": ["compression=[lora]", f"model.pretrained={hf}"],
               "distill": ["compression=[distill]", f"compression.distill.teacher={hf}"],
               "grad-powersgd": ["compression=[grad-powersgd]", "compression.grad_powersgd.start_iter=2"]}
    for name, extra in methods.items():
        layouts = ["ddp"] if name == "grad-powersgd" else ["single"] if name == "share-layers" else ["single", "fsdp"]
        for layout in layouts:
            overrides = [*MODELS["d128-L4"], "batch_size=4", "data.seq_len=128", "data.vocab_size=2048",
                         *LAYOUTS[layout], "precision=fp32", "device=cpu", *extra]
            yield {"model": "d128-L4", "batch": 4, "seq": 128, "ac": "none", "layout": layout, "precision": "fp32",
                   "compression": name, "overrides": overrides}


# transformers families as a model.pretrained checkpoint (d128, 4 layers, 4 heads / 2 kv heads, MLP 384; untied)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 48}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 32, "sliding_window": 32, "query_pre_attn_scalar": 32}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", {}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 96}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 96}),
}


def family_grid(tmp: Path):
    """A checkpoint of each family (FAMILY_CONFIGS) as model.pretrained, batch 4 x seq 128, AC none/full, fp32."""
    for family in FAMILY_CONFIGS:
        path = family_dir(tmp / family, family, vocab=2048)
        for ac in ("none", "full"):
            # data.vocab_size: what the memory probe builds the vocabulary with (the tokenizer's)
            overrides = [f"model.pretrained={path}", f"data.tokenizer={path / 'tokenizer.json'}", "batch_size=4",
                         "data.vocab_size=2048", "data.seq_len=128", f"parallel.activation_checkpointing={ac}",
                         "parallel=single", "precision=fp32", "device=cpu"]
            yield {"model": family, "batch": 4, "seq": 128, "ac": ac, "layout": "single", "precision": "fp32",
                   "overrides": overrides}


def family_dir(out: Path, family: str, *, vocab: int) -> Path:
    """A random checkpoint of `family` with a word-level tokenizer of `vocab` tokens (an EOS among them)."""
    import transformers
    from tokenizers import Tokenizer, models

    name, extra = FAMILY_CONFIGS[family]
    config = getattr(transformers, name)(**{"vocab_size": vocab, "hidden_size": 128, "intermediate_size": 384,
                                            "num_hidden_layers": 4, "num_attention_heads": 4,
                                            "num_key_value_heads": 2, "max_position_embeddings": 256,
                                            "tie_word_embeddings": False, "eos_token_id": 0, **extra})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    words = {"<|endoftext|>": 0} | {f"w{i}": i for i in range(1, vocab)}
    Tokenizer(models.WordLevel(words, unk_token="w1")).save(str(out / "tokenizer.json"))
    return out


def hf_model_dir(out: Path, model_overrides: list[str], *, vocab: int) -> Path:
    """A Hugging Face directory of a seeded model of that shape (a LoRA base, a teacher), with a tokenizer.json."""
    from tokenizers import Tokenizer, models

    from effitrain.compose import compose_one
    from effitrain.model.build import build_model, init_weights

    cfg = compose_one([*model_overrides, f"data.vocab_size={vocab}"])
    model = build_model(cfg.model, vocab_size=vocab, max_seq_len=cfg.data.seq_len)
    init_weights(model, cfg=cfg.model, seed=cfg.seed)
    model.save_pretrained(out)
    Tokenizer(models.BPE()).save(str(out / "tokenizer.json"))  # distill checks one is there
    return out


def estimated(overrides: list[str]) -> tuple[int, str]:
    from effitrain.compose import compose_one
    from effitrain.estimate import estimate

    est = estimate(compose_one(overrides), timing=False)
    return est.peak_bytes, est.peak_phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset of the grid")
    parser.add_argument("--compression", action="store_true", help="the compression methods' grid instead")
    parser.add_argument("--tp", action="store_true", help="the tensor-parallel grid instead (2 ranks, SP off/on)")
    parser.add_argument("--pp", action="store_true",
                        help="the pipeline grid instead (pp(2) gpipe/1f1b/multi-stage schedules, pp-fsdp on 4 ranks)")
    parser.add_argument("--ep", action="store_true", help="the expert-parallel grid instead (qwen3_moe, ep=2)")
    parser.add_argument("--families", action="store_true",
                        help="transformers families' checkpoints (model.pretrained) instead, single process")
    parser.add_argument("--json", default="bench_estimate.json")
    parser.add_argument("--md", default=None, help="also write the markdown table here")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE,...",
                        help="keep the grid points matching all these fields (repeatable: any of them), "
                             "e.g. --only model=d128-L4,batch=4,seq=64,ac=full,layout=fsdp")
    parser.add_argument("--alone", type=int, default=0, metavar="N",
                        help="measure each config N times, each in a fresh launch of its own (not sharing one "
                             "profiled process with the other configs): how repeatable a row is")
    parser.add_argument("--launches", type=int, default=1, metavar="N",
                        help="launch the multi-rank configs N times and compare with the highest peak, the lowest "
                             "beside it: how repeatable the measure is (default 1)")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()  # the compression grid's model directory, kept until the end
    points = list(compression_grid(Path(tmp.name)) if args.compression else tp_grid() if args.tp
                  else pp_grid() if args.pp else ep_grid(Path(tmp.name)) if args.ep
                  else family_grid(Path(tmp.name)) if args.families else grid(args.quick))
    if args.only:
        wanted = [dict(kv.split("=", 1) for kv in spec.split(",")) for spec in args.only]
        points = [p for p in points if any(all(str(p.get(k)) == v for k, v in w.items()) for w in wanted)]
    launches: dict[int, list[int]] = {}  # per point, its peak in each launch that measured it
    if args.alone:  # each repeat a launch of its own
        points = [p for p in points for _ in range(args.alone)]
        launches = {i: measure([p["overrides"]], nproc=nproc_of(p["overrides"])) for i, p in enumerate(points)}
    else:  # one launch per world size, all its configs in one profiled process; multi-rank ones `--launches` times
        for nproc in sorted({nproc_of(p["overrides"]) for p in points}):
            index = [i for i, p in enumerate(points) if nproc_of(p["overrides"]) == nproc]
            for _ in range(args.launches if nproc > 1 else 1):
                peaks = measure([points[i]["overrides"] for i in index], nproc=nproc)
                for i, peak in zip(index, peaks, strict=True):
                    launches.setdefault(i, []).append(peak)
    rows = []
    print(f"{'model':<8} {'b':>3} {'seq':>4} {'AC':<5} {'layout':<22} {'prec':<5} {'compression':<15} "
          f"{'estimated MiB':>13} {'measured MiB':>13} {'lowest':>7} {'error':>7}  peak moment")
    for i, point in enumerate(points):
        est, phase = estimated(point["overrides"])
        got = max(launches[i])  # the peak a run must fit: the highest any launch reached
        row = {k: v for k, v in point.items() if k != "overrides"} | {
            "estimated_mib": est / MiB, "measured_mib": got / MiB, "error_pct": 100 * (est - got) / got,
            "launches_mib": [v / MiB for v in launches[i]], "peak_phase": phase,
            "overrides": " ".join(point["overrides"])}
        rows.append(row)
        print(f"{row['model']:<8} {row['batch']:>3} {row['seq']:>4} {row['ac']:<5} {row['layout']:<22} "
              f"{row['precision']:<5} {row.get('compression', 'none'):<15} {row['estimated_mib']:>13.2f} "
              f"{row['measured_mib']:>13.2f} {min(launches[i]) / MiB:>7.2f} "
              f"{row['error_pct']:>+6.1f}%  {phase}", flush=True)
    worst = max(abs(r["error_pct"]) for r in rows)
    print(f"worst |error| {worst:.1f}% over {len(rows)} configs; within 10%: "
          f"{sum(abs(r['error_pct']) <= 10 for r in rows)}/{len(rows)}")
    Path(args.json).write_text(json.dumps({"rows": rows, "worst_abs_error_pct": worst}, indent=2))
    if args.md:
        md = ["| model | batch | seq | AC | layout | precision | compression | estimated MiB | measured MiB "
              "(highest launch) | lowest launch | error | peak moment |", "|---" * 12 + "|"]
        md += [f"| {r['model']} | {r['batch']} | {r['seq']} | {r['ac']} | {r['layout']} | {r['precision']} | "
               f"{r.get('compression', 'none')} | {r['estimated_mib']:.2f} | {r['measured_mib']:.2f} | "
               f"{min(r['launches_mib']):.2f} | {r['error_pct']:+.1f}% | {r['peak_phase']} |" for r in rows]
        Path(args.md).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
