"""`effitrain eval HF_DIR|RUN_DIR [overrides]`: validation loss, perplexity and bits per byte on any data option,
and the accuracy of each task in eval.tasks, for a Hugging Face model directory (config.json, weights,
tokenizer.json) -- or a run directory once the checkpoint export exists.

The data is tokenized with the model's own tokenizer (data.tokenizer is set to it), so the validation windows are
the ones a run on that data with that tokenizer would evaluate; bits per byte divides the summed loss by the UTF-8
bytes those windows' target tokens stand for, so it compares models across tokenizers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from effitrain.errors import UsageError


def eval_command(args: list[str]) -> int:
    if not args or args[0].startswith("-") or "=" in args[0]:
        raise UsageError("eval needs a model: effitrain eval HF_DIR|RUN_DIR [overrides...]")
    model_dir = _model_dir(Path(args[0]).expanduser())
    from effitrain.checks import check_all
    from effitrain.compose import compose_one, normalize

    overrides = normalize(args[1:])
    if any(o.split("=", 1)[0].lstrip("+") in ("data.tokenizer", "model.pretrained") for o in overrides):
        raise UsageError("eval sets data.tokenizer and model.pretrained to the model's own; do not override them")
    cfg = compose_one([*overrides, f"data.tokenizer={model_dir / 'tokenizer.json'}", f"model.pretrained={model_dir}"])
    check_all(cfg)
    result = evaluate_model(cfg)
    print(format_table(model_dir, cfg, result))
    print(json.dumps(result))
    return 0


def _model_dir(path: Path) -> Path:
    """The HF directory to load: `path` itself, or a run directory's latest checkpoint exported once."""
    from effitrain.engine.export import model_dir

    if (path / "config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise UsageError(f"{path}: no tokenizer.json beside config.json (eval tokenizes with the model's own)")
    return model_dir(path)


def evaluate_model(cfg) -> dict:
    """{'val_loss', 'val_ppl', 'val_bpb', 'task/<name>'...} of cfg.model.pretrained on cfg.data's validation split;
    for data=mix also 'val_loss/<source>' and 'val_bpb/<source>' (val_loss: weighted by the sources' weights, as a
    mixed run reports it); for fine-tuning data the loss on the held-out answers (val_tokens: their tokens; no
    bits per byte: the answers' bytes are not the windows' the others count)."""
    import torch

    from effitrain.base.distributed import pick_device
    from effitrain.data.loader import Shard
    from effitrain.data.mix import prepare_run_data
    from effitrain.data.tokens import load_tokenizer
    from effitrain.engine.loop import evaluate
    from effitrain.model.build import build_model
    from effitrain.precision.build import build_precision

    device = pick_device(cfg.device, 0)
    data = prepare_run_data(cfg.data)
    tokenizer = load_tokenizer(data.tokenizer_dir)
    model = build_model(cfg.model, vocab_size=data.vocab_size, max_seq_len=cfg.data.seq_len).to(device)
    precision = build_precision(cfg.precision, device=device)
    sets = data.validation(seq_len=cfg.data.seq_len, batch_size=cfg.batch_size, num_batches=cfg.eval_batches,
                           shard=Shard())
    result = data.evaluate(sets, loss_of=lambda batches: evaluate(model, batches, precision=precision,
                                                                  device=device)[0])

    def bits_of(loss: float, batches) -> float | None:  # fine-tuning samples: None (answers' bytes are not windows')
        return bits_per_byte(loss, batches, tokenizer) if isinstance(batches[0], torch.Tensor) else None

    if data.mixed:  # per source; overall their weighted mean, as val_loss
        per_source = {name: bits_of(result[f"val_loss/{name}"], batches) for name, batches in sets.items()}
        result |= {f"val_bpb/{name}": bpb for name, bpb in per_source.items()}
        weighted = [(data.weights[name], bpb) for name, bpb in per_source.items() if data.weights[name] > 0]
        result["val_bpb"] = (None if any(bpb is None for _, bpb in weighted) else
                             sum(w * bpb for w, bpb in weighted) / sum(w for w, _ in weighted))
    else:
        result["val_bpb"] = bits_of(result["val_loss"], next(iter(sets.values())))
    # the tokens the loss is taken on: every target of a window, the answer tokens of fine-tuning samples
    result["val_tokens"] = sum(b[:, 1:].numel() if isinstance(b, torch.Tensor) else b.trained_tokens()
                               for batches in sets.values() for b in batches)
    return result | _task_scores(cfg, model, tokenizer, precision, device)


def _task_scores(cfg, model, tokenizer, precision, device) -> dict:
    from effitrain.eval.tasks import load_task, task_accuracy

    scores = {}
    for spec in cfg.eval.tasks:
        task = load_task(spec, max_items=cfg.eval.task_items)
        scores[f"task/{task.name}"] = task_accuracy(model, tokenizer, task, max_len=cfg.data.seq_len,
                                                    precision=precision, device=device)
    return scores


def bits_per_byte(mean_loss: float, batches, tokenizer) -> float | None:
    """Summed loss in bits over the UTF-8 bytes of the target tokens; None when they stand for no bytes."""
    table = token_bytes(tokenizer)
    nbytes = sum(int(table[b[:, 1:]].sum()) for b in batches)
    ntokens = sum(b[:, 1:].numel() for b in batches)
    return mean_loss * ntokens / math.log(2) / nbytes if nbytes else None


def token_bytes(tokenizer):
    """UTF-8 bytes each token id stands for (special tokens: none): for a byte-level BPE each character of a token
    is one byte; otherwise the length of its decoded text."""
    import torch
    from tokenizers import decoders

    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    sizes = []
    for i in range(tokenizer.get_vocab_size()):
        token = tokenizer.id_to_token(i)
        if token is None or token in special:
            sizes.append(0)
        else:
            sizes.append(len(token) if byte_level else len(tokenizer.decode([i]).encode()))
    return torch.tensor(sizes, dtype=torch.long)


def format_table(model_dir: Path, cfg, result: dict) -> str:
    lines = [f"eval {model_dir} on data={cfg.data.name} ({result['val_tokens']:,} validation tokens)"]
    for key, value in result.items():
        if key != "val_tokens":
            lines.append(f"  {key:<24} {'undefined' if value is None else f'{value:.4f}'}")
    return "\n".join(lines)
