"""Evaluation: multiple-choice tasks (files, the built-in next-line task, log-likelihood scoring), bits per byte,
the `effitrain eval` verb on an HF directory, and eval.tasks during training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import cli_in_process, compose, read_metrics, run_cli
from effitrain.data import DataError
from effitrain.eval.tasks import Item, Task, _score, _tokens, load_task, read_task_file


def _task_file(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"context": "def add(a, b):\n", "choices": ["    return a + b", "import os"], "label": 0}


@pytest.mark.parametrize("bad, message", [
    ({"context": "x", "choices": ["a", "b", "c", "d"], "label": 4}, r"t\.jsonl:2: label 4 is out of range"),
    ({"context": "x", "choices": ["a"], "label": 0}, r"t\.jsonl:2: .*two or more"),
    ({"context": "x", "choices": ["a", "b"]}, r't\.jsonl:2: a task record needs "context", "choices" and "label"'),
    ("{not json", r"t\.jsonl:2: not valid JSON"),
])
def test_a_bad_task_record_names_file_and_line(tmp_path, bad, message):
    path = _task_file(tmp_path / "t.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError, match=message):
        read_task_file(path)


def test_a_bad_task_file_stops_train_before_it_starts(tmp_path):
    path = _task_file(tmp_path / "t.jsonl", [GOOD, {**GOOD, "label": 2}])
    proc = run_cli("train", f"eval.tasks=[{path}]", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"effitrain: error: {path}:2: label 2 is out of range for 2 choices (0..1)")
    assert not (tmp_path / "outputs").exists()


def test_next_line_task_is_deterministic_and_fair():
    task = load_task("next-line", max_items=40)
    again = load_task("next-line", max_items=40)
    assert task == again and len(task.items) == 40
    for item in task.items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4 and 0 <= item.label < 4
        answer = item.choices[item.label]
        lengths = [len(c) for c in item.choices]
        assert max(lengths) - min(lengths) <= 2 * max(4, len(answer) // 5)  # length does not give it away
    assert len({it.label for it in task.items}) == 4  # the right answer is not always in one place


def _tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=64)).eval()


@pytest.fixture
def tokenizer(corpus, cache_dir):
    from effitrain.data.prepare import prepare_data
    from effitrain.data.tokens import load_tokenizer

    cfg = compose(["data=text", f"data.paths=[{corpus}]", f"data.cache_dir={cache_dir}", "data.vocab_size=512"])
    return load_tokenizer(prepare_data(cfg.data).tokens.directory)


def test_batched_scores_are_each_choices_log_likelihood(tokenizer):
    from effitrain.precision.build import build_precision

    model = _tiny_model(tokenizer.get_vocab_size())
    precision = build_precision(compose([]).precision, device=torch.device("cpu"))
    rows = [(0, c, *_tokens(tokenizer, "for i in range(10):\n", choice, max_len=16))
            for c, choice in enumerate(["    print(i)", "x", "    total = total + i * 2  # a long line cut"])]
    batched = _score(model, rows, precision=precision, device=torch.device("cpu"))
    for (_, _, ids, n), got in zip(rows, batched, strict=True):
        assert len(ids) <= 17
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x[:, :-1]).logits.float(), -1)[0]
        want = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
        assert got == pytest.approx(want, abs=1e-4)


def test_token_bytes_are_the_utf8_bytes_of_the_text(tokenizer):
    from effitrain.commands.evaluate import token_bytes

    text = "naïve café — 数据 ✓ def f(x):\n    return x\n"
    ids = tokenizer.encode(text).ids
    assert int(token_bytes(tokenizer)[torch.tensor(ids)].sum()) == len(text.encode())
    assert int(token_bytes(tokenizer)[tokenizer.token_to_id("<|endoftext|>")]) == 0


@pytest.fixture
def hf_dir(tmp_path, tokenizer):
    out = tmp_path / "hf"
    _tiny_model(tokenizer.get_vocab_size()).save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def test_eval_verb_reports_loss_perplexity_bpb_and_task_accuracy(hf_dir, corpus, tmp_path):
    task = _task_file(tmp_path / "mine.jsonl", [GOOD] * 3)
    proc = run_cli("eval", str(hf_dir), "data=text", f"data.paths=[{corpus}]", f"data.cache_dir={tmp_path / 'c'}",
                   "data.seq_len=32", "batch_size=4", "eval_batches=2", "device=cpu",
                   f"eval.tasks=[next-line,{task}]", "eval.task_items=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(result["val_loss"] - math.log(512)) < 1.0  # an untrained model: about uniform over the vocabulary
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert 0.5 < result["val_bpb"] < 8 and result["val_tokens"] == 2 * 4 * 32
    assert 0 <= result["task/next-line"] <= 1 and result["task/mine"] in (0.0, 1.0)  # one item, three times
    assert "val_bpb" in proc.stdout and "task/next-line" in proc.stdout


def test_eval_refuses_what_it_cannot_evaluate(tmp_path, hf_dir, capsys):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("{}")
    proc = run_cli("eval", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2 and "does not match effitrain's config schema" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    code, stderr = cli_in_process(capsys, "eval", str(hf_dir), f"data.tokenizer={hf_dir / 'tokenizer.json'}")
    assert code == 2 and "do not override them" in stderr and stderr.count("\n") == 1


def test_training_scores_eval_tasks_at_each_evaluation(tiny, tmp_path, corpus):
    from effitrain.engine.train import run

    lines = [ln for ln in sorted(corpus.iterdir())[0].read_text().splitlines() if ln.strip()]
    task = _task_file(tmp_path / "lines.jsonl", [{"context": "\n".join(lines[i - 3:i]) + "\n",
                                                  "choices": [lines[i], lines[i + 7]], "label": 0}
                                                 for i in range(3, 23)])
    run(compose(tiny(f"eval.tasks=[{task}]")), tmp_path / "run")
    evals = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["enabled"] is False
    assert all(0 <= r["task/lines"] <= 1 for r in evals)
    assert not any("task/lines" in r for r in read_metrics(tmp_path / "run") if "val_loss" not in r)


def test_task_accuracy_counts_right_answers(tokenizer):
    """A choice that is the context's own continuation beats gibberish for no model; but accuracy must be the share
    of argmax == label: two copies of one item with opposite labels score exactly one half."""
    from effitrain.eval.tasks import task_accuracy
    from effitrain.precision.build import build_precision

    item = Item("x = 1\n", ["y = 2", "zzz"], 0)
    task = Task("pair", [item, Item(item.context, item.choices, 1)])
    acc = task_accuracy(_tiny_model(tokenizer.get_vocab_size()), tokenizer, task, max_len=16,
                        precision=build_precision(compose([]).precision, device=torch.device("cpu")),
                        device=torch.device("cpu"))
    assert acc == 0.5
