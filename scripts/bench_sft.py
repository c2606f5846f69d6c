"""effitrain's fine-tuning beside TRL's SFTTrainer: the same model, samples, masking, batches, optimizer and steps.

    pip install -e ".[bench]"          # trl among them
    python scripts/bench_sft.py [--steps 40] [--batch 8] [--rounds 2] [--lr 1e-3] [--json bench_sft.json]

One tiny random Llama with a tokenizer and chat template of its own (a byte-level BPE trained on this interpreter's
standard library: nothing downloaded), fine-tuned on the embedded set (data=chat-stdlib: a function's code as the
user turn, its docstring's summary as the answer) by both, unpacked (TRL packs differently), fp32, AdamW with no
weight decay at a constant learning rate, grad-norm clipping at 1, one process on the CPU.

The same work, checked rather than assumed:
  - samples: TRL gets the conversations as conversational prompt-completion records (what a user gives it) and
    tokenizes and masks them itself; the script counts the samples whose token ids and trained mask equal effitrain's;
  - batches: TRL reads its samples in the order effitrain's sampler draws them (a sequential sampler over them laid
    out in that order), so every step of both sees the same rows: the per-step losses must agree (the first step's
    to 1e-5: same weights, same batch), and so the held-out answer loss at the end (within 1%);
  - held-out loss: effitrain's own evaluation (mean over every held-out answer token) on the same held-out rows,
    for both trained models.
A third run per round, effitrain with data.packing=true (the same rows per step, each holding as many samples as
fit: more answer tokens per step), shows what packing buys.
Timing: answer (trained) tokens per second of the optimizer steps, median over steps after --warmup; effitrain's
from its metrics (step_time_s), TRL's from a callback stamping each step's begin and end. Rounds run interleaved
(effitrain, TRL, effitrain, TRL, ...); the ratio is the median of the per-round ratios. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _effitrain_run import machine, run_effitrain

# "\n" after each role name: the answer's first word starts a pre-token of its own, so the prompt rendered alone is a
# token prefix of the whole conversation (TRL masks by that prefix, effitrain by character spans)
TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}:\n{{ m['content'] }}<|eot|>{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>assistant:\n{% endif %}")
SPECIALS = ["<|bos|>", "<|eot|>", "<|pad|>"]


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing medians")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default="bench_sft.json")
    return p.parse_args()


def make_model(out: Path, *, seed: int) -> Path:
    """A tiny random Llama (transformers' own config class) with a BPE, specials and chat template of its own."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    stdlib = Path(os.__file__).parent
    lines = [line for f in sorted(stdlib.glob("*.py"))[:60] for line in f.read_text(errors="ignore").splitlines()]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eot|>",
        "pad_token": "<|pad|>", "add_bos_token": False, "chat_template": TEMPLATE, "model_max_length": 1024}))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=ids["<|bos|>"], eos_token_id=ids["<|eot|>"], pad_token_id=ids["<|pad|>"],
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def overrides(model: Path, cache: Path, args, *, packing: bool = False) -> list[str]:
    data = [f"model.pretrained={model}", "data=chat-stdlib", f"data.cache_dir={cache}", f"data.seq_len={args.seq_len}",
            f"data.packing={str(packing).lower()}"]
    optimizer = ["optimizer=adamw", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0", "optimizer.betas=[0.9,0.95]",
                 "optimizer.eps=1e-8", "schedule=constant", "schedule.warmup_steps=0", "grad_clip=1.0"]
    return [*data, *optimizer, f"batch_size={args.batch}", f"max_steps={args.steps}", f"seed={args.seed}",
            "precision=fp32", f"eval_every={args.steps}", f"eval_batches={args.eval_batches}", "logging.every=1"]


def prepared(model: Path, cache: Path, args, *, packing: bool = False):
    """(effitrain's composed config, its prepared fine-tuning data, its training batches by step)."""
    from effitrain.checks import check_all
    from effitrain.compose import compose_one
    from effitrain.data import run_data_config
    from effitrain.data.loader import Shard, TrainBatches
    from effitrain.data.mix import prepare_run_data

    cfg = compose_one(overrides(model, cache, args, packing=packing))
    check_all(cfg)
    data = prepare_run_data(run_data_config(cfg))
    batches = TrainBatches(data.sampler(seq_len=args.seq_len, seed=cfg.seed), batch_size=args.batch,
                           grad_accum_steps=1, shard=Shard())
    return cfg, data, batches


def packed_answer_tokens(model: Path, cache: Path, args) -> list[int]:
    """Trained tokens per step of the packed run (data.packing=true: the same rows per step hold more samples)."""
    _, _, batches = prepared(model, cache, args, packing=True)
    return [int((batches.get(step, 0).labels != -100).sum()) for step in range(args.steps)]


def effitrain_side(model: Path, cache: Path, args):
    """effitrain's prepared data: (the samples in the order its sampler draws them, step by step, as (name, ids,
    trained mask); the held-out batches; the records by name)."""
    from effitrain.data.loader import Shard
    from effitrain.data.records import stdlib_records

    cfg, data, batches = prepared(model, cache, args)
    fitted = data.fitted("train", args.seq_len)
    by_input = {}
    for i, n in fitted.keep:
        ids, mask = fitted.samples.get(i)
        by_input[tuple(ids[:n].tolist())] = (fitted.samples.names[i], ids[:n + 1], mask[:n + 1])
    order = []
    for step in range(args.steps):
        batch = batches.get(step, 0)
        for row, positions in zip(batch.input_ids, batch.position_ids, strict=True):
            n = int(positions.argmax()) + 1  # positions run 0..n-1 over the sample, then 0 over the pads
            order.append(by_input[tuple(row[:n].tolist())])
    held_out = data.validation(seq_len=args.seq_len, batch_size=args.batch, num_batches=args.eval_batches,
                               shard=Shard())
    records = {r.name: r.value for r in stdlib_records(cfg.data).read()}
    return order, next(iter(held_out.values())), records


def held_out_loss(model, batches) -> float:
    """effitrain's evaluation: the mean over every held-out answer token (fp32)."""
    import torch
    from omegaconf import OmegaConf

    from effitrain.engine.loop import evaluate
    from effitrain.precision import GROUP
    from effitrain.precision.build import build_precision

    fp32 = OmegaConf.structured(GROUP.schemas["fp32"])
    return evaluate(model, batches, precision=build_precision(fp32, device=torch.device("cpu")),
                    device=torch.device("cpu"))[0]


class StepClock:
    """A TrainerCallback's worth of stamps: each optimizer step's wall time."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                clock.begin = time.perf_counter()

            def on_step_end(self, *a, **k):
                clock.times.append(time.perf_counter() - clock.begin)

        self.times, self.begin, self.callback = [], 0.0, Callback()


def trl_run(model_dir: Path, order, records, held_out, args, out: Path) -> dict:
    """TRL's SFTTrainer over the same samples in effitrain's order: per-step losses, step times, held-out loss,
    and how many of its tokenized samples equal effitrain's."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    class InOrder(SFTTrainer):  # the samples laid out in effitrain's order are read as they lie
        def _get_train_sampler(self, *_args, **_kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    rows = [{"prompt": records[name][:-1], "completion": records[name][-1:]} for name, _, _ in order]
    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
                       logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=args.seed,
                       max_length=args.seq_len + 1, packing=False, completion_only_loss=True, use_cpu=True,
                       dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    clock = StepClock()
    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock.callback])
    # TRL folds its completion mask into labels (-100 outside the completion)
    same = sum(list(t["input_ids"]) == ids.tolist() and [x != -100 for x in t["labels"]] == mask.tolist()
               for t, (_, ids, mask) in zip(trainer.train_dataset, order, strict=True))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "step_times": clock.times, "same_samples": int(same), "samples": len(order),
            "val_loss": held_out_loss(trainer.model, held_out), "answer_tokens": _answer_tokens(order, args),
            "trl": __import__("trl").__version__, "all_finite": bool(np.all(np.isfinite(losses)))}


def effitrain_run(model_dir: Path, cache: Path, args, out: Path, answer_tokens: list[int], *,
                  packing: bool = False) -> dict:
    run_effitrain(overrides(model_dir, cache, args, packing=packing), out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [m["loss"] for m in metrics], "step_times": [m["step_time_s"] for m in metrics],
            "val_loss": next(m["val_loss"] for m in reversed(metrics) if "val_loss" in m),
            "answer_tokens": answer_tokens}


def _answer_tokens(order, args) -> list[int]:
    """Trained tokens per step (the labels of each step's rows)."""
    return [sum(int(mask[1:].sum()) for _, _, mask in order[s * args.batch:(s + 1) * args.batch])
            for s in range(args.steps)]


def answer_tokens_per_s(run: dict, warmup: int) -> float:
    return statistics.median(t / s for t, s in zip(run["answer_tokens"][warmup:], run["step_times"][warmup:],
                                                   strict=True))


def main():
    args = parse()
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", seed=args.seed)
        order, held_out, records = effitrain_side(model, tmp / "cache", args)
        from transformers import AutoModelForCausalLM

        initial = held_out_loss(AutoModelForCausalLM.from_pretrained(model), held_out)
        packed_tokens = packed_answer_tokens(model, tmp / "cache", args)
        rounds = []
        for r in range(args.rounds):
            ours = effitrain_run(model, tmp / "cache", args, tmp / f"effitrain-{r}", _answer_tokens(order, args))
            theirs = trl_run(model, order, records, held_out, args, tmp / f"trl-{r}")
            packed = effitrain_run(model, tmp / "cache", args, tmp / f"packed-{r}", packed_tokens, packing=True)
            rounds.append({"effitrain": ours, "trl": theirs, "effitrain_packed": packed})
    first = rounds[0]
    a, b = first["effitrain"]["losses"], first["trl"]["losses"]
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)]
    speed = [answer_tokens_per_s(r["effitrain"], args.warmup) / answer_tokens_per_s(r["trl"], args.warmup)
             for r in rounds]
    result = {
        "machine": machine(), "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "rounds": rounds, "held_out_loss_initial": initial,
        "same_samples": f"{first['trl']['same_samples']} of {first['trl']['samples']}",
        "first_step_loss": {"effitrain": a[0], "trl": b[0], "rel_diff": rel[0]},
        "max_step_loss_rel_diff": max(rel),
        "held_out_loss": {"effitrain": first["effitrain"]["val_loss"], "trl": first["trl"]["val_loss"]},
        "answer_tokens_per_s": {k: statistics.median(answer_tokens_per_s(r[k], args.warmup) for r in rounds)
                                for k in ("effitrain", "trl", "effitrain_packed")},
        "held_out_loss_packed": first["effitrain_packed"]["val_loss"],
        "speed_ratio_median": statistics.median(speed), "speed_ratios": speed}
    val = result["held_out_loss"]
    val_gap = abs(val["effitrain"] - val["trl"]) / val["trl"]
    print(f"machine: {result['machine']}; TRL {first['trl']['trl']}; {args.steps} steps of {args.batch} unpacked "
          f"samples (seq_len {args.seq_len}), {args.rounds} interleaved rounds")
    table = [("tokenized samples equal (ids and mask)", result["same_samples"]),
             ("first-step loss effitrain / TRL", f"{a[0]:.6f} / {b[0]:.6f} (rel. diff {rel[0]:.1e})"),
             ("largest per-step loss rel. diff", f"{max(rel):.1e}"),
             ("held-out answer loss before", f"{initial:.4f}"),
             ("held-out answer loss after effitrain / TRL", f"{val['effitrain']:.4f} / {val['trl']:.4f} "
                                                           f"({100 * val_gap:.2f}% apart)"),
             ("answer tokens/s effitrain / TRL", f"{result['answer_tokens_per_s']['effitrain']:.0f} / "
                                                 f"{result['answer_tokens_per_s']['trl']:.0f}"),
             ("effitrain / TRL (median of rounds)", f"{result['speed_ratio_median']:.2f}x "
                                                    f"({', '.join(f'{s:.2f}' for s in speed)})"),
             ("effitrain packed: answer tokens/s", f"{result['answer_tokens_per_s']['effitrain_packed']:.0f}"),
             ("effitrain packed: held-out loss after", f"{result['held_out_loss_packed']:.4f}")]
    for label, value in table:
        print(f"| {label:<44} | {value:>40} |")
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
