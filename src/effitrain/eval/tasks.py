"""Multiple-choice tasks scored by log-likelihood: a local JSONL file of {"context", "choices", "label"} records, or
the built-in `next-line` task made from the embedded corpus (which of four lines really follows this context).

A model answers the choice whose tokens it finds most likely after the context (summed log-probabilities, as
lm-evaluation-harness's `acc`); accuracy is torchmetrics' micro multiclass accuracy, synced across ranks. Every
rank scores every item: under FSDP/TP each forward is a collective, so all ranks must run the same forwards.
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass
from pathlib import Path

from effitrain.data import DataError
from effitrain.errors import UsageError


@dataclass(frozen=True)
class Item:
    context: str
    choices: list[str]
    label: int  # index of the right choice


@dataclass(frozen=True)
class Task:
    name: str
    items: list[Item]


def load_task(spec: str, *, max_items: int) -> Task:
    """A built-in task by name, or a JSONL task file (its first `max_items` records; its stem names it)."""
    if spec in BUILTIN:
        return Task(spec, BUILTIN[spec](max_items))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"eval.tasks: {spec!r} is neither a built-in task ({', '.join(BUILTIN)}) nor a file")
    return Task(path.stem, read_task_file(path)[:max_items])


def read_task_file(path: Path) -> list[Item]:
    """Every record of a JSONL task file, checked; a bad one is a DataError naming the file and line."""
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            items.append(_item(line, where=f"{path}:{lineno}"))
    if not items:
        raise DataError(f"{path}: no task records")
    return items


def _item(line: str, *, where: str) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not {"context", "choices", "label"} <= record.keys():
        raise DataError(f'{where}: a task record needs "context", "choices" and "label"')
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f'{where}: "context" must be a string and "choices" a list of two or more non-empty strings')
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label!r} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
    return Item(context, choices, label)


def next_line_items(count: int, *, seed: int = 0, context_lines: int = 6) -> list[Item]:
    """`count` questions from the stdlib's held-out .py files (the default run's validation split): the lines
    before a line, and that line among three lines of similar length from other files.

    Deterministic (seeded); distractors of similar length so that length alone does not give the answer away."""
    from effitrain.data import StdlibData
    from effitrain.data.corpus import build_corpus, is_validation

    cfg = StdlibData()
    corpus = build_corpus(cfg)
    held_out = [f for f in corpus.files if f.name.endswith(".py") and is_validation(f, cfg.val_fraction)]
    files = [[ln for ln in doc.text.splitlines() if ln.strip()] for doc in corpus.documents(held_out)]
    pool = sorted({(len(ln), ln, i) for i, lines in enumerate(files) for ln in lines if len(ln.strip()) >= 12})
    rng = random.Random(seed)
    slots = [(i, j) for i, lines in enumerate(files) for j in range(context_lines, len(lines))
             if len(lines[j].strip()) >= 12]
    items = []
    for i, j in rng.sample(slots, min(count, len(slots))):
        answer = files[i][j]
        slack = max(4, len(answer) // 5)
        lo, hi = bisect.bisect_left(pool, (len(answer) - slack,)), bisect.bisect_left(pool, (len(answer) + slack + 1,))
        near = [ln for _, ln, k in pool[lo:hi] if k != i and ln != answer]
        if len(near) < 3:
            continue
        choices = [answer, *rng.sample(near, 3)]
        rng.shuffle(choices)
        items.append(Item("\n".join(files[i][j - context_lines:j]) + "\n", choices, choices.index(answer)))
    return items


BUILTIN = {"next-line": next_line_items}


def task_accuracy(model, tokenizer, task: Task, *, max_len: int, precision, device, batch_size: int = 32) -> float:
    """Share of the task's items whose right choice the model finds most likely after the context.

    Args:
        tokenizer: a `tokenizers.Tokenizer` (the model's).
        max_len: the model's sequence length; a context is cut from the left so context + choice fits.
    """
    import torch
    from torchmetrics.classification import MulticlassAccuracy

    rows = [(k, c, *_tokens(tokenizer, item.context, choice, max_len))
            for k, item in enumerate(task.items) for c, choice in enumerate(item.choices)]
    scores = torch.full((len(task.items), max(len(it.choices) for it in task.items)), float("-inf"))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            for (k, c, _, _), score in zip(batch, _score(model, batch, precision=precision, device=device),
                                           strict=True):
                scores[k, c] = score
    model.train(was_training)
    metric = MulticlassAccuracy(num_classes=scores.shape[1], average="micro").to(device)
    metric.update(scores.argmax(1).to(device), torch.tensor([it.label for it in task.items], device=device))
    return float(metric.compute())


def _tokens(tokenizer, context: str, choice: str, max_len: int) -> tuple[list[int], int]:
    """(context + choice ids, number of choice ids), at most max_len + 1 ids; the context keeps at least one."""
    choice_ids = tokenizer.encode(choice).ids[:max_len]
    context_ids = tokenizer.encode(context).ids or [tokenizer.token_to_id("<|endoftext|>") or 0]
    context_ids = context_ids[-(max_len + 1 - len(choice_ids)):]
    return context_ids + choice_ids, len(choice_ids)


def _score(model, batch, *, precision, device) -> list[float]:
    """Summed log-probability of each row's choice tokens (rows right-padded: causal attention ignores the pad)."""
    import torch

    width = max(len(ids) for _, _, ids, _ in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width - 1), dtype=torch.bool)
    for r, (_, _, row, n) in enumerate(batch):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, len(row) - 1 - n:len(row) - 1] = True  # positions that predict the choice's tokens
    ids, mask = ids.to(device), mask.to(device)
    with precision.autocast():
        logits = model(input_ids=ids[:, :-1]).logits
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask).sum(1).tolist()


class TaskSuite:
    """The tasks of eval.tasks with the tokenizer they are scored under: `scores` gives {'task/<name>': accuracy}."""

    def __init__(self, specs: list[str], *, max_items: int, tokenizer_dir: Path):
        self.tasks = [load_task(spec, max_items=max_items) for spec in specs]
        if self.tasks:
            from effitrain.data.tokens import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer_dir)

    def scores(self, model, *, max_len: int, precision, device) -> dict[str, float]:
        return {f"task/{t.name}": task_accuracy(model, self.tokenizer, t, max_len=max_len, precision=precision,
                                                device=device) for t in self.tasks}


def check_specs(specs: list[str]) -> None:
    """Task files exist and hold valid records (built-in names need nothing): found before a run starts."""
    for spec in specs:
        if spec not in BUILTIN:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise UsageError(f"eval.tasks: {spec!r} is neither a built-in task ({', '.join(BUILTIN)}) nor a file")
            read_task_file(path)
