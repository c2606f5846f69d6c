"""Expert parallelism's cost and saving, measured: a random qwen3_moe checkpoint (8 experts per layer, top-2) trained
through `effitrain train` on 2 ranks under ddp and fsdp, each with parallel.ep=1 and 2.

Per run: the optimizer state this rank holds (AdamW's two fp32 moments of the parameters it owns, from the run's
log: 1/ep of the experts under ep, the rest whole under ddp or 1/2 under fsdp), the bytes a rank sends to the other
in the step's all-to-alls (a2a_bytes_per_rank: dispatch and combine, forward and backward, from their split sizes),
and the median tokens/s per device and step time (after warm-up).

    python scripts/bench_experts.py [--steps 10] [--json bench_experts.json]

Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _effitrain_run import bench_parser, machine, run_effitrain  # noqa: E402

SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32, "intermediate_size": 256, "num_experts": 8, "num_experts_per_tok": 2,
         "moe_intermediate_size": 256, "max_position_embeddings": 256, "tie_word_embeddings": False}
LAYOUTS = {"ddp": ["parallel=ddp"], "ddp ep=2": ["parallel=ddp", "parallel.ep=2"],
           "fsdp": ["parallel=fsdp"], "fsdp ep=2": ["parallel=fsdp", "parallel.ep=2"]}


def corpus(root: Path) -> Path:
    """40 stdlib modules as text files (what the tests train on)."""
    out = root / "corpus"
    out.mkdir()
    for src in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
        (out / f"{src.stem}.txt").write_text(src.read_text(encoding="utf-8", errors="replace"))
    return out


def checkpoint(root: Path, texts: Path) -> Path:
    """A random Qwen3MoeForCausalLM with a byte-level BPE of its own, exactly its embeddings' size."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = root / "qwen3_moe"
    out.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    lines = [line for f in sorted(texts.iterdir())[:5] for line in f.read_text().splitlines()]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|eot|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<|eot|>"}))
    config = transformers.Qwen3MoeConfig(vocab_size=tok.get_vocab_size(), eos_token_id=0, **SHAPE)
    transformers.set_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def measure(name: str, layout: list[str], *, base: list[str], root: Path) -> dict:
    run_dir = root / name.replace(" ", "_").replace("=", "")
    summary = run_effitrain([*base, *layout], run_dir)
    state = int(re.search(r"of state on this rank \((\d+) bytes\)", (run_dir / "train.log").read_text()).group(1))
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r][2:]  # after warm-up
    a2a = [r["a2a_bytes_per_rank"] for r in steps if "a2a_bytes_per_rank" in r]
    return {"layout": name, "optimizer_state_bytes_per_rank": state,
            "a2a_bytes_per_rank_per_step": statistics.median(a2a) if a2a else 0,
            "tokens_per_s_per_device": statistics.median(r["tokens_per_s_per_device"] for r in steps),
            "step_time_s": statistics.median(r["step_time_s"] for r in steps), "final_loss": summary["final_loss"]}


def main() -> None:
    parser = bench_parser("expert parallelism: memory per rank and all-to-all bytes", steps=10,
                          json_default="bench_experts.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = corpus(root)
        base = [f"model.pretrained={checkpoint(root, texts)}", "data=text", f"data.paths=[{texts}]",
                f"data.cache_dir={root / 'cache'}", "data.seq_len=128", "batch_size=4", f"max_steps={args.steps}",
                f"eval_every={args.steps}", "eval_batches=1", "checkpoint=off", "device=cpu",
                "launcher.nproc_per_node=2", *args.overrides]
        rows = [measure(name, layout, base=base, root=root) for name, layout in LAYOUTS.items()]
    print(f"{machine()}; qwen3_moe d128 L4, 8 experts top-2, 2 ranks x 4 x 128 tokens, fp32")
    print(f"{'layout':<10} {'optimizer state/rank':>21} {'a2a bytes/rank/step':>20} {'tok/s/device':>13} "
          f"{'step s':>7} {'loss':>7}")
    for r in rows:
        print(f"{r['layout']:<10} {r['optimizer_state_bytes_per_rank'] / 2**20:>17.2f} MiB "
              f"{r['a2a_bytes_per_rank_per_step'] / 2**20:>16.2f} MiB {r['tokens_per_s_per_device']:>13,.0f} "
              f"{r['step_time_s']:>7.3f} {r['final_loss']:>7.4f}")
    out = Path(args.json)
    out.write_text(json.dumps({"machine": machine(), "shape": SHAPE, "steps": args.steps, "runs": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
