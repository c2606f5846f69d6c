"""Fine-tuning data (issue 25): data=chat / data=instruct / data=chat-stdlib with the model's own tokenizer and chat
template; labels only on the answers (their EOS included), packed samples that never see each other (loss and
gradients of a packed sample = that sample alone), data.overflow, an exact sampler (kill + resume through the CLI
is bit-identical), training single and under ddp(2) with LoRA, and the embedded set lowering the held-out answer
loss of a tiny pretrained model."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import (
    assert_losses_close,
    cli_in_process,
    compose,
    losses,
    only_run_dir,
    read_metrics,
    run_cli,
    start_cli,
    train_ok,
    wait_for,
)
from test_own_tokenizer import own_checkpoint

CHATS = [  # multi-turn, with a system turn in some: every assistant turn is trained on
    {"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                  {"role": "assistant", "content": f"it is {2 * i}."},
                  *([{"role": "user", "content": "and times two?"},
                     {"role": "assistant", "content": f"then {4 * i}."}] if i % 3 == 0 else [])]}
    for i in range(60)
]
PAIRS = [{"prompt": f"Name the number after {i}.", "completion": f"{i + 1}, of course."} for i in range(60)]


@pytest.fixture(scope="module")
def model(corpus, tmp_path_factory) -> Path:
    """A tiny random llama with its own tokenizer and chat template (128 positions: rope needs no more weights)."""
    out = own_checkpoint(tmp_path_factory.mktemp("model") / "m", corpus)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 256}))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    out = {}
    for name, rows in (("chat", CHATS), ("instruct", PAIRS)):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def args(model: Path, files: dict, cache_dir: Path, option: str, *extra: str) -> list[str]:
    paths = [] if option == "chat-stdlib" else [f"data.paths=[{files[option]}]"]
    return [f"model.pretrained={model}", f"data={option}", *paths, f"data.cache_dir={cache_dir}", "data.seq_len=64",
            "batch_size=4", "max_steps=6", "eval_every=3", "eval_batches=1", "logging.progress=false", *extra]


def prepared(overrides: list[str]):
    from effitrain.checks import check_all
    from effitrain.data import run_data_config
    from effitrain.data.mix import prepare_run_data

    cfg = compose(overrides)
    check_all(cfg)
    return prepare_run_data(run_data_config(cfg))


def _decode(model: Path, ids) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model / "tokenizer.json")).decode([int(i) for i in ids], skip_special_tokens=False)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


def test_chat_labels_are_exactly_the_answers_and_their_eot(model, files, cache_dir):
    data = prepared(args(model, files, cache_dir, "chat", "data.system_prompt=Be brief."))
    names = data.train.names
    for i in range(len(data.train)):
        ids, mask = data.train.get(i)
        turns = CHATS[int(names[i].rsplit(":", 1)[1]) - 1]["messages"]
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        trained = [_decode(model, ids[a:b]) for a, b in _runs(mask)]
        # a token joining the prompt's last space to the answer's first word is the answer's
        assert [t.lstrip(" ") for t in trained] == [f"{a}<|eot|>" for a in answers], (names[i], trained)
        context = _decode(model, ids[~mask])
        assert context.startswith("<|bos|>system: Be brief.<|eot|><|bos|>user: ")
        assert all(a not in context for a in answers)
    report, kept = data.report()["train"], data.fitted("train", 64).keep
    assert report["trained_tokens"] == sum(int(data.train.get(i)[1][1:n + 1].sum()) for i, n in kept)
    assert report["context_tokens"] == sum(n for _, n in kept) - report["trained_tokens"] > 0


def test_instruct_labels_are_the_completion_and_eos_and_batches_carry_them(model, files, cache_dir):
    from effitrain.data.sft import IGNORE

    data = prepared(args(model, files, cache_dir, "instruct"))
    for i in range(len(data.train)):
        ids, mask = data.train.get(i)
        pair = PAIRS[int(data.train.names[i].rsplit(":", 1)[1]) - 1]
        assert [_decode(model, ids[a:b]) for a, b in _runs(mask)] == [pair["completion"] + "<|eot|>"]
        assert _decode(model, ids[~mask]) == f"### Instruction:\n{pair['prompt']}\n\n### Response:\n"
    sampler = data.sampler(seq_len=64, seed=3)
    batch = sampler.windows(0, sampler.num_windows)  # every row once
    labels, inputs = batch.labels.numpy(), batch.input_ids.numpy()
    assert (labels != IGNORE).sum() == data.report()["train"]["trained_tokens"]
    # a label is the next input of its own sample; the first position of each sample is no sample's label target
    nxt = (labels[:, :-1] != IGNORE) & (batch.position_ids.numpy()[:, 1:] != 0)
    assert (labels[:, :-1][nxt] == inputs[:, 1:][nxt]).all()
    every = prepared(args(model, files, cache_dir, "instruct", "data.train_on=all"))
    assert all(every.train.get(i)[1].all() for i in range(len(every.train)))


def test_parquet_and_csv_give_the_samples_of_their_json_lines(model, files, cache_dir, tmp_path):
    """data.paths may name tables `datasets` reads (only the columns the option reads): the same records render to
    the same samples as their JSON lines."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(CHATS).to_parquet(str(tmp_path / "chat.parquet"))
    datasets.Dataset.from_list([p | {"id": i} for i, p in enumerate(PAIRS)]).to_csv(str(tmp_path / "pairs.csv"),
                                                                                  index=False)
    for option, table in (("chat", tmp_path / "chat.parquet"), ("instruct", tmp_path / "pairs.csv")):
        a = prepared(args(model, files, cache_dir, option))
        b = prepared([*args(model, files, cache_dir, option), f"data.paths=[{table}]"])
        # row by row (the split hashes the names, whose file part differs)
        rows = [{int(s.names[i].rsplit(":", 1)[1]): tuple(map(bytes, s.get(i))) for s in (d.train, d.val)
                 for i in range(len(s))} for d in (a, b)]
        assert rows[0] == rows[1] and len(rows[0]) == len(CHATS if option == "chat" else PAIRS)


def _only(batch, keep: slice):
    """The batch with the labels outside `keep` ignored: lm_loss is then one sample's loss, in its row's context."""
    from effitrain.data.sft import IGNORE, SftBatch

    labels = torch.full_like(batch.labels, IGNORE)
    labels[:, keep] = batch.labels[:, keep]
    return SftBatch(batch.input_ids, labels, batch.position_ids.clone())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_packed_sample_has_the_loss_and_gradients_of_that_sample_alone(family, corpus, files, tmp_path):
    """engine/loop.lm_loss on a packed row (the other samples' labels ignored) against the sample in a row alone;
    the control: the same row with positions that do not restart gives other logits (the test can fail)."""
    from transformers import AutoModelForCausalLM

    from effitrain.data.sft import make_batch
    from effitrain.engine.loop import lm_loss

    path = own_checkpoint(tmp_path / family, corpus, family=family)
    data = prepared(args(path, files, tmp_path / "cache", "chat", "data.seq_len=128"))
    packed = data.fitted("train", 128)
    row = next(r for r in packed.rows if len(r) >= 2)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    together = make_batch(packed, [row], seq_len=128, pad_id=0)
    at = 0
    for k in row:
        n = packed.keep[k][1]
        results = []
        for batch in (_only(together, slice(at, at + n)), make_batch(packed, [[k]], seq_len=n, pad_id=0)):
            hf.zero_grad()
            loss = lm_loss(hf, batch)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in hf.parameters()]))
        (packed_loss, packed_grads), (alone_loss, alone_grads) = results
        torch.testing.assert_close(packed_loss, alone_loss, rtol=0, atol=1e-5)
        for a, b in zip(packed_grads, alone_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        if at > 0:  # the control: without restarting positions the same sample sees the ones before it; its
            # logits then move by far more than the packed row's differ from the sample's alone (the test can fail)
            crosstalk = torch.arange(128)[None]
            with torch.no_grad():
                seen = hf(input_ids=together.input_ids, position_ids=crosstalk, use_cache=False).logits[0, at:at + n]
                own = hf(input_ids=together.input_ids, position_ids=together.position_ids,
                         use_cache=False).logits[0, at:at + n]
                alone = make_batch(packed, [[k]], seq_len=n, pad_id=0)
                single = hf(input_ids=alone.input_ids, position_ids=alone.position_ids, use_cache=False).logits[0]
            assert (own - single).abs().max() < 1e-4 < (seen - single).abs().max()
        at += n


def test_overflow_drops_truncates_or_refuses_naming_the_row(model, files, cache_dir, tmp_path, capsys, monkeypatch):
    long = {"messages": [{"role": "user", "content": "tell me a long story " * 20},
                         {"role": "assistant", "content": "no"}]}
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*CHATS[:30], long, *CHATS[30:]]))
    base = [*args(model, files, cache_dir, "chat"), f"data.paths=[{path}]", "data.seq_len=128"]
    drop = prepared(base).report()["train"]
    assert drop["dropped_overflow"] == 1 and drop["kept"] == drop["samples"] - 1
    cut = prepared([*base, "data.overflow=truncate"]).report()["train"]
    # truncated at seq_len: the answer is lost with the tail, so the sample trains nothing and is dropped as such
    assert cut["truncated"] == 1 and cut["dropped_no_answer"] == 1 and cut["dropped_overflow"] == 0
    answered = prepared([*base, "data.overflow=truncate", "data.train_on=all"]).report()["train"]
    assert answered["truncated"] == 1 and answered["kept"] == answered["samples"]
    monkeypatch.chdir(tmp_path)
    code, err = cli_in_process(capsys, "train", *base, "data.overflow=refuse")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{path.name}:31:" in err and "data.overflow=refuse" in err


def test_bad_input_is_one_line(model, files, cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (plain / name).write_bytes((model / name).read_bytes())
    config = json.loads((model / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cases = [
        ([f"model.pretrained={plain}"], "has no chat template"),
        (["data.train_on=prompts"], "data.train_on='prompts' is not one of: answers, all"),
        (["data.vocab_size=512"], "vocab_size"),  # a key of text data: not one of chat's
        ([f"data.paths=[{bad}]"], "bad.jsonl:1: the conversation has no assistant turn"),
    ]
    for extra, message in cases:
        code, err = cli_in_process(capsys, "train", *args(model, files, cache_dir, "chat"), *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert message in err, err
    code, err = cli_in_process(capsys, "train", "data=chat", f"data.paths=[{files['chat']}]")
    assert code == 2 and "give model.pretrained=DIR" in err, err


def test_rows_are_disjoint_across_ranks_and_a_pure_function_of_the_step(model, files, cache_dir):
    from effitrain.data.loader import Shard, TrainBatches

    data = prepared(args(model, files, cache_dir, "chat"))
    sampler = data.sampler(seq_len=64, seed=5)
    ranks = [TrainBatches(sampler, batch_size=2, grad_accum_steps=2, shard=Shard(r, 2)) for r in range(2)]
    seen = []
    for step in range(sampler.num_windows // 8):  # one epoch: no row twice
        for micro in range(2):
            for b in ranks:
                seen += [tuple(row) for row in b.get(step, micro).input_ids.tolist()]
    assert len(set(seen)) == len(seen)
    again = data.sampler(seq_len=64, seed=5)
    assert torch.equal(again.windows(37, 3).labels, sampler.windows(37, 3).labels)  # any order of asking


def _run_dir(cwd: Path) -> Path | None:
    dirs = [d for d in (cwd / "outputs").glob("*/*") if d.is_dir()]
    return dirs[0] if dirs else None


COMPARED = ("step", "loss", "grad_norm", "lr", "val_loss")


def test_chat_with_lora_trains_and_a_kill_then_resume_is_bit_identical(model, files, cache_dir, tmp_path):
    overrides = args(model, files, cache_dir, "chat", "compression=lora", "max_steps=10", "eval_every=5",
                     "checkpoint.every=4", "checkpoint.keep_last=0", "logging.every=1")
    reference = tmp_path / "reference"
    reference.mkdir()
    train_ok(reference, *overrides)
    ref = only_run_dir(reference / "outputs")
    report = json.loads((ref / "data_report.json").read_text())
    assert report["format"] == "chat" and report["train"]["trained_tokens"] > 0
    assert "trainable parameters" in (ref / "train.log").read_text()
    cwd = tmp_path / "killed"
    cwd.mkdir()
    proc = start_cli(cwd, "train", *overrides)
    wait_for(lambda: (d := _run_dir(cwd)) is not None and (d / "checkpoints/step-4/manifest.json").is_file(), proc, cwd)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = _run_dir(cwd)
    assert len(read_metrics(run_dir)) < 10, "the run finished before the kill: nothing was tested"
    result = run_cli("resume", str(run_dir), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    compared = [[{k: r.get(k) for k in COMPARED} for r in read_metrics(d)] for d in (ref, run_dir)]
    assert compared[0] == compared[1]


@pytest.fixture(scope="module")
def lora_layouts(model, files, cache_dir, tmp_path_factory) -> dict[str, Path]:
    """data=instruct with LoRA on one global batch of 4 packed rows: one process, one process in 2 micro-steps,
    ddp(2) and fsdp(2) (2 rows per rank)."""
    base = [*args(model, files, cache_dir, "instruct", "compression=lora", "optimizer.lr=1e-2"), "max_steps=4"]
    out = {}
    for name, extra in (("single", ["batch_size=4"]), ("accum", ["batch_size=2", "grad_accum_steps=2"])):
        cwd = tmp_path_factory.mktemp(name)
        train_ok(cwd, *base, *extra)
        out[name] = only_run_dir(cwd / "outputs")
    cwd = tmp_path_factory.mktemp("dp")
    train_ok(cwd, "-m", *base, "batch_size=2", "launcher.nproc_per_node=2", "parallel=ddp,fsdp")
    for job in (cwd / "outputs" / "multirun").glob("*/*/[0-9]*"):
        out[OmegaConf.load(job / ".hydra" / "config.yaml").parallel.strategy] = job
    return out


@pytest.mark.parametrize("layout", ["accum", "ddp", "fsdp"])
def test_lora_fine_tuning_is_the_same_under_accumulation_ddp_and_fsdp(lora_layouts, layout):
    """The step's loss is the mean over every answer token of the global batch (samples differ in length, so the
    mean of per-micro-batch or per-rank means would not be): the same loss per step however the batch is split."""
    single = losses(lora_layouts["single"])
    assert len(single) == 4 and all(np.isfinite(single))
    assert_losses_close(single, losses(lora_layouts[layout]), steps=4, rtol=1e-5, what=f"{layout} vs single")


def test_the_embedded_set_lowers_the_held_out_answer_loss_and_eval_reads_it(model, cache_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """data=chat-stdlib, 24 steps of a tiny random pretrained model: the loss on held-out answers (files never
    trained on) falls well below its start; `effitrain eval` of the export reads the run's last value again, and
    `effitrain sample --chat` answers through the template."""
    overrides = [f"model.pretrained={model}", "data=chat-stdlib", f"data.cache_dir={cache_dir}", "data.seq_len=128",
                 "batch_size=8", "max_steps=24", "eval_every=24", "eval_batches=4", "optimizer.lr=3e-3",
                 "logging.progress=false"]
    monkeypatch.chdir(tmp_path)
    start = _eval(capsys, model, overrides)
    code, err = cli_in_process(capsys, "train", *overrides)  # in this process: no interpreter start
    assert code == 0, err
    run_dir = only_run_dir(tmp_path / "outputs")
    end = read_metrics(run_dir)[-1]["val_loss"]
    with capsys.disabled():
        print(f"held-out answer loss: {start['val_loss']:.3f} -> {end:.3f} ({start['val_tokens']} answer tokens)")
    assert end < start["val_loss"] - 0.5, (start, end)
    code, err = cli_in_process(capsys, "export", str(run_dir))
    assert code == 0, err
    assert _eval(capsys, run_dir, overrides)["val_loss"] == pytest.approx(end, rel=1e-4)
    from effitrain.engine.export import sample_text

    answer = sample_text(run_dir, "def f(x):\n    return x + 1", chat=True, tokens=24)  # what sample --chat prints
    with capsys.disabled():
        print(f"sample --chat: {answer!r}")
    assert isinstance(answer, str) and "<|bos|>" not in answer  # the answer alone, not the template's turns


def _eval(capsys, model: Path, overrides: list[str]) -> dict:
    """`effitrain eval MODEL data=... batch_size eval_batches` in this process: its JSON line."""
    from effitrain.cli import main

    keep = [o for o in overrides if o.startswith(("data", "batch_size", "eval_batches"))]
    capsys.readouterr()
    assert main(["eval", str(model), *keep]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_fine_tuned_model_answers_in_the_template_and_stops_at_its_eos(model, files, cache_dir, tmp_path, capsys):
    """60 steps on the conversations teach the tiny model the answers' form, their end-of-turn included: its
    export's greedy `sample --chat` answer ends at the EOS, well before the token limit."""
    from tokenizers import Tokenizer

    from effitrain.engine.export import export_run, sample_text

    train_ok(tmp_path, *args(model, files, cache_dir, "chat", "max_steps=60", "eval_every=60", "batch_size=8",
                             "optimizer.lr=1e-2"))
    exported = export_run(only_run_dir(tmp_path / "outputs"), out=tmp_path / "export")
    limit = 24
    answer = sample_text(exported, "what is 7 plus 7?", chat=True, tokens=limit)
    with capsys.disabled():
        print(f"sample --chat after 60 steps: {answer!r}")
    tokens = Tokenizer.from_file(str(model / "tokenizer.json")).encode(answer, add_special_tokens=False).ids
    assert 0 < len(tokens) < limit // 2 and "<|" not in answer, answer  # stopped at <|eot|>, not at the limit


def test_a_mix_of_conversations_and_text_trains_each_on_its_own_labels(model, files, corpus, cache_dir, tmp_path,
                                                                       capsys, monkeypatch):
    """data=mix with a chat source beside a text one: every batch is rows (the chat rows' labels only on the answers,
    a text row's on every next token, positions 0..T-1), drawn by the weights; a run reports val_loss per source,
    keeps the chat template it rendered with, and a mix whose chat sources disagree on the template is one line."""
    from effitrain.data.sft import IGNORE

    mix = [f"model.pretrained={model}", "data=mix", f"data.cache_dir={cache_dir}", "data.seq_len=64",
           f"data.sources.chat={{option:chat,weight:1,paths:[{files['chat']}]}}",
           f"data.sources.text={{option:text,weight:1,paths:[{corpus}]}}",
           "batch_size=4", "max_steps=4", "eval_every=4", "eval_batches=1", "logging.progress=false"]
    data = prepared(mix)
    sampler = data.sampler(seq_len=64, seed=1)
    batch = sampler.windows(0, 64)
    assert batch.input_ids.shape == (64, 64)
    drawn = sampler.counts(0, 64)
    assert drawn["chat"] + drawn["text"] == 64 and min(drawn.values()) >= 24  # 1:1 within a block's rounding
    text_rows = (batch.labels != IGNORE).all(dim=1) & (batch.position_ids == torch.arange(64)).all(dim=1)
    assert int(text_rows.sum()) == drawn["text"]
    assert torch.equal(batch.labels[text_rows][:, :-1], batch.input_ids[text_rows][:, 1:])  # the window's next tokens
    chat = batch.labels[~text_rows]
    assert ((chat != IGNORE).sum(1) < (batch.position_ids[~text_rows] >= 0).sum(1)).all()  # answers only
    report = data.report()["sources"]
    assert report["chat"]["format"] == "chat" and report["chat"]["train"]["trained_tokens"] > 0
    monkeypatch.chdir(tmp_path)
    code, err = cli_in_process(capsys, "train", *mix)
    assert code == 0, err
    run_dir = only_run_dir(tmp_path / "outputs")
    last = read_metrics(run_dir)[-1]
    assert {"val_loss/chat", "val_loss/text"} <= last.keys()
    assert last["val_loss"] == pytest.approx((last["val_loss/chat"] + last["val_loss/text"]) / 2, rel=1e-6)
    from effitrain.data import chat_template

    assert (run_dir / "chat_template.jinja").read_text() == chat_template(model / "tokenizer.json", given=None)
    code, err = cli_in_process(capsys, "train", *mix, "data.sources.other={option:chat-stdlib,weight:1,"
                                                      "chat_template:'{{ messages }}'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "different chat templates" in err, err


def test_chat_stdlib_from_an_effitrain_run_uses_its_tokenizer_and_effitrains_template(corpus, cache_dir, tmp_path,
                                                                                     capsys, monkeypatch):
    """`effitrain train data=chat-stdlib checkpoint.resume_from=RUN` from a pretraining run of effitrain's own BPE:
    the run's tokenizer renders the conversations with effitrain's template (its <|endoftext|> ends each answer),
    the weights are the run's, and the export carries the template: AutoTokenizer and `sample --chat` read it."""
    from transformers import AutoTokenizer

    from conftest import tiny_overrides
    from effitrain.data import OWN_CHAT_TEMPLATE
    from effitrain.engine.export import export_run, sample_text

    monkeypatch.chdir(tmp_path)
    pre = tiny_overrides(corpus, cache_dir, "max_steps=2", "eval_every=2")
    code, err = cli_in_process(capsys, "train", *pre, "hydra.run.dir=pre")
    assert code == 0, err
    model = [o for o in pre if o.startswith("model.")]
    tuned = [*model, "data=chat-stdlib", f"data.cache_dir={cache_dir}", "data.seq_len=128", "batch_size=4",
             "max_steps=2", "eval_every=2", "eval_batches=1", "logging.progress=false", "hydra.run.dir=tuned"]
    code, err = cli_in_process(capsys, "train", *tuned, f"checkpoint.resume_from={tmp_path / 'pre'}")
    assert code == 0, err
    run = tmp_path / "tuned"
    assert (run / "tokenizer.json").read_bytes() == (tmp_path / "pre" / "tokenizer.json").read_bytes()
    assert (run / "chat_template.jinja").read_text() == OWN_CHAT_TEMPLATE
    assert "starting from the weights of" in (run / "train.log").read_text()
    assert json.loads((run / "data_report.json").read_text())["train"]["trained_tokens"] > 0
    exported = export_run(run, out=tmp_path / "export")
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|user|>\nhi\n<|assistant|>\n"
    assert isinstance(sample_text(exported, "def f(x): return x", chat=True, tokens=4), str)
    code, err = cli_in_process(capsys, "train", *tuned, "data=chat-stdlib")  # no model, no run: one line
    assert code == 2 and "checkpoint.resume_from=RUN" in err, err
