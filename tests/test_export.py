"""A run's model leaves it: `effitrain export` writes a Hugging Face directory that plain transformers loads with
identical logits, `model.pretrained=` and `checkpoint.resume_from=` train from it, `effitrain sample` shows what it
learned, `reproduce --from-step` checks a run from a checkpoint, and a run directory someone sent cannot run code."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from conftest import cli_in_process, only_run_dir, read_metrics, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, cache_dir):
    """family -> the run directory of a 6-step tiny run (checkpoints at steps 3 and 6), made on first use."""
    made = {}

    def get(family: str):
        if family not in made:
            cwd = tmp_path_factory.mktemp(family)
            model = ["model=gpt2-124m"] if family == "gpt2" else []
            result = run_cli("train", *tiny_overrides(corpus, cache_dir, *model, "checkpoint.every=3",
                                                      "checkpoint.keep_last=0", "schedule.warmup_steps=2"), cwd=cwd)
            assert result.returncode == 0, result.stderr[-3000:]
            made[family] = only_run_dir(cwd / "outputs")
        return made[family]
    return get


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.extended)])  # 36 s: CI time
def test_export_loads_in_plain_transformers_with_identical_logits(family, trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effitrain.engine.export import _run_parts, load_trained_model

    run_dir, out = trained(family), tmp_path / "hf"
    result = run_cli("export", str(run_dir), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    cfg, checkpoint, tokenizer = _run_parts(run_dir, step=None)
    mine = load_trained_model(cfg, checkpoint, vocab_size=tokenizer.get_vocab_size())
    ids = torch.tensor([tokenizer.encode("def main(argv):\n    return 0\n").ids])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, mine(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(out)("def f(x):")["input_ids"] == tokenizer.encode("def f(x):").ids
    assert json.loads((out / "effitrain.json").read_text())["step"] == 6
    if family == "gpt2":  # transformers' own layout again: one fused Conv1D c_attn
        assert type(hf.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_export_options_and_refusals(trained, tmp_path, capsys):
    from effitrain.cli import main

    run_dir = trained("llama")
    out = tmp_path / "bf16"
    assert main(["export", str(run_dir), "--step", "3", "--dtype", "bf16", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "effitrain.json").read_text())["step"] == 3
    for args, message in [(["--step", "4"], "no complete checkpoint of step 4"),
                          (["--dtype", "fp8"], "--dtype fp8: choose one of fp32, bf16"),
                          (["--out", str(out)], "exists; give a new directory")]:
        code, stderr = cli_in_process(capsys, "export", str(run_dir), *args)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, (args, stderr)


def test_export_quantizes_a_plain_run_after_training(trained, tmp_path):
    """--quantize int8|int4: post-training quantization (the baseline QAT is measured against), in the layout plain
    transformers + torchao loads; its logits stay near the float model's."""
    from transformers import AutoModelForCausalLM

    from effitrain.engine.export import export_run
    from effitrain.errors import UsageError

    run_dir = trained("llama")
    for args, message in [({"quantize": "int2"}, "--quantize int2: choose one of int8, int4"),
                          ({"quantize": "int8", "dtype": "bf16"}, "unquantized parts stay fp32")]:
        with pytest.raises(UsageError, match=message):
            export_run(run_dir, out=tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()
    float_model = AutoModelForCausalLM.from_pretrained(export_run(run_dir, out=tmp_path / "f"), local_files_only=True)
    out = export_run(run_dir, out=tmp_path / "q", quantize="int4")
    assert json.loads((out / "effitrain.json").read_text())["quantized"] == "ptq-int4"
    quantized = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert "Intx" in type(quantized.model.layers[0].self_attn.q_proj.weight).__name__
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(quantized(input_ids=ids).logits, float_model(input_ids=ids).logits,
                                   rtol=0.1, atol=0.1)


def test_training_starts_from_an_export_and_from_a_checkpoint(trained, corpus, cache_dir, tmp_path):
    """model.pretrained=<export>, checkpoint.resume_from=<run dir> (with or without its optimizer) all start from the
    run's final weights: the same first-step loss on the same first batch, not a fresh model's; each starts a new
    schedule (lr 0 at step 1: warmup)."""
    from conftest import compose
    from effitrain.engine.export import export_run
    from effitrain.engine.train import run

    run_dir = trained("llama")
    fresh = read_metrics(run_dir)[0]["loss"]  # the original run's step 1: the same batch, from its initial weights
    out = export_run(run_dir, out=tmp_path / "hf")
    firsts = []
    for i, extra in enumerate([[f"model.pretrained={out}", f"data.tokenizer={out}/tokenizer.json"],
                               [f"checkpoint.resume_from={run_dir}"],
                               [f"checkpoint.resume_from={run_dir}", "checkpoint.load_optimizer=true"]]):
        # in this process (the command line's own path is the trained fixture's): 3 s a run instead of 12
        run(compose(tiny_overrides(corpus, cache_dir, "max_steps=1", "schedule.warmup_steps=2", *extra)),
            tmp_path / str(i))
        firsts.append(read_metrics(tmp_path / str(i))[0])
    assert all(f["lr"] == 0.0 for f in firsts)
    assert firsts[0]["loss"] == pytest.approx(firsts[1]["loss"], rel=1e-6) == firsts[2]["loss"]
    assert abs(firsts[0]["loss"] - fresh) > 1e-3


def test_a_run_directory_teaches_a_student(trained, corpus, cache_dir, tmp_path):
    """compression.distill.teacher=RUN_DIR: the run's latest checkpoint is exported once (RUN_DIR/export/step-6)
    and distils into a new run on its tokenizer; estimate counts its parameters from the saved config."""
    from conftest import compose
    from effitrain.engine.train import train_here
    from effitrain.estimate import estimate

    run_dir = tmp_path / "teacher"
    shutil.copytree(trained("llama"), run_dir)
    overrides = tiny_overrides(corpus, cache_dir, "max_steps=2", "compression=[distill]",
                               f"compression.distill.teacher={run_dir}", f"data.tokenizer={run_dir}/tokenizer.json")
    student = train_here(compose(overrides), tmp_path / "student")
    assert (run_dir / "export" / "step-6" / "config.json").is_file()
    assert read_metrics(tmp_path / "student")[-1]["teacher_flops_per_step"] > 0
    teacher_params = sum(p.numel() for p in student.state.converters.converters[-1].teacher.parameters())
    assert estimate(compose(overrides), timing=False).memory["teacher_parameters"] == 4 * teacher_params


def test_eval_of_a_run_directory_gives_its_final_validation_loss(trained, corpus, cache_dir, tmp_path):
    """`effitrain eval RUN_DIR` exports the latest checkpoint and evaluates it: on the run's own data settings, the
    validation loss the run logged at its last step."""
    run_dir = trained("llama")
    result = run_cli("eval", str(run_dir), "data=text", f"data.paths=[{corpus}]", f"data.cache_dir={cache_dir}",
                     "data.seq_len=32", "batch_size=4", "eval_batches=2", "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])["val_loss"]
    assert measured == pytest.approx(read_metrics(run_dir)[-1]["val_loss"], rel=1e-5)
    assert (run_dir / "export" / "step-6" / "config.json").is_file()


def test_sample_prints_a_deterministic_continuation(trained, tmp_path):
    from effitrain.engine.export import export_run, sample_text

    run_dir = trained("llama")
    first = run_cli("sample", str(run_dir), "def main(", "--tokens", "12", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("def main(") and len(first.stdout) > len("def main(") + 1
    assert sample_text(run_dir, "def main(", tokens=12) + "\n" == first.stdout  # greedy: the same every time
    out = export_run(run_dir, out=tmp_path / "hf")
    assert sample_text(out, "def main(", tokens=12) + "\n" == first.stdout  # the export continues as the run
    assert sample_text(out, "def main(", tokens=12, temperature=1.5, seed=3).startswith("def main(")


def test_reproduce_from_a_checkpoint_and_its_exit_codes(trained, tmp_path, monkeypatch):
    """--from-step 3 reruns steps 4-6 from the step-3 checkpoint: identical (exit 0); a relative change of 1e-7 in
    the original's grad_norm is within tolerance (exit 3, or 1 with --exact); a larger one diverges (exit 1)."""
    from effitrain.commands.reproduce import reproduce_run

    monkeypatch.chdir(tmp_path)  # reproduce writes under ./outputs
    run_dir = tmp_path / "run"
    shutil.copytree(trained("llama"), run_dir)
    result = run_cli("reproduce", str(run_dir), "--from-step", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    assert "identical: 3 steps after step 3, loss, grad_norm, lr and val_loss bit-for-bit" in result.stdout
    records = read_metrics(run_dir)
    for scale, exact, code in [(1 + 1e-7, False, 3), (1 + 1e-7, True, 1), (1.5, False, 1)]:
        changed = [dict(r) for r in records]
        changed[4]["grad_norm"] *= scale
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
        assert reproduce_run(run_dir, rtol=1e-3, exact=exact, from_step=3) == code, (scale, exact)
    verdict = max((tmp_path / "outputs").glob("*/*_reproduce-run*/reproduce.json"), key=lambda p: p.stat().st_mtime)
    assert "diverged at step 5: original grad_norm" in json.loads(verdict.read_text())["verdict"]
    result = run_cli("reproduce", str(run_dir), "--from-step", "2", cwd=tmp_path)
    assert result.returncode == 2 and "no complete checkpoint of step 2" in result.stderr


class _Payload:
    """Unpickling this would run a command: a checkpoint must never be loaded that way."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copy, (__file__, str(self.marker)))


def test_a_foreign_checkpoint_cannot_run_code(trained, tmp_path, capsys):
    """A step directory whose DCP metadata, or whose byte entry (the trainer state), would run code when unpickled,
    its manifest sealed to match (as a sender who knows the format would): resume and export refuse it in one line,
    and the payload never ran."""
    import torch.distributed.checkpoint as dcp

    from effitrain.checkpoint.layout import checksum_files, sealed

    for part in ("metadata", "entry"):
        run_dir = tmp_path / part
        shutil.copytree(trained("llama"), run_dir)
        step = run_dir / "checkpoints" / "step-6"
        marker = tmp_path / f"ran-{part}"
        if part == "metadata":
            (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
        else:  # every entry as it was, but the trainer state replaced by the payload
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            dcp_to_torch_save(step, tmp_path / "plain.pt")
            state = torch.load(tmp_path / "plain.pt", weights_only=False)  # our own checkpoint: trusted here
            state["trainer"] = _Payload(marker)
            manifest = (step / "manifest.json").read_text()
            shutil.rmtree(step)
            dcp.save(state, checkpoint_id=step, no_dist=True)
            (step / "manifest.json").write_text(manifest)
        manifest = json.loads((step / "manifest.json").read_text())
        (step / "manifest.json").write_text(sealed(manifest | {"files": checksum_files(step, sync=False)}))
        for verb in (["resume", str(run_dir), "max_steps=8"], ["export", str(run_dir), "--out", str(tmp_path / "x")]):
            if part == "entry" and verb[0] == "export":
                continue  # export reads the model only; the byte entry is resume's
            code, stderr = cli_in_process(capsys, *verb)  # in this process: what would run, would run here
            assert code == 2 and stderr.count("\n") == 1, stderr
            assert not marker.exists()


def test_a_foreign_config_cannot_reach_out(trained, tmp_path, capsys):
    """A saved config that would connect to a rendezvous elsewhere, or read this machine's environment through an
    interpolation, is refused in one line (the rendezvous unless --allow-external)."""
    from effitrain.received import load_run_config

    for name, edit, message in [
            ("rdzv", lambda t: t.replace("nnodes: 1", "nnodes: 2").replace("rdzv_endpoint: null",
                                                                           "rdzv_endpoint: evil.example:29500"),
             "asks for a multi-node rendezvous"),
            ("env", lambda t: t.replace("name: run", "name: ${oc.env:HOME}"), "calls a resolver")]:
        run_dir = tmp_path / name
        shutil.copytree(trained("llama"), run_dir)
        saved = run_dir / ".hydra" / "config.yaml"
        saved.write_text(edit(saved.read_text()))
        for verb in ("reproduce", "resume"):  # in this process: refused before anything launches
            code, stderr = cli_in_process(capsys, verb, str(run_dir))
            assert code == 2 and message in stderr and stderr.count("\n") == 1, (verb, stderr)
        if name == "rdzv":
            assert load_run_config(run_dir, allow_external=True).launcher.nnodes == 2
