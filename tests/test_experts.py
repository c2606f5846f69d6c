"""Expert parallelism (issue 26, item 4): `parallel.ep=2` on a tiny random qwen3_moe checkpoint (4 experts per layer,
top-2, its own tokenizer), trained through the real CLI on 2 gloo ranks.

- ddp and fsdp with ep=2 (each rank holds 2 of the 4 experts, tokens dispatched by all-to-all) give single's losses
  at 1e-5 on the same global batch of 4 sequences, with the expert load and the all-to-all bytes in the metrics. The
  checkpoint's router_aux_loss_coef is 0 for that: under any data parallelism each rank's router loss balances its
  own tokens (transformers computes it per forward), which moves the loss by that term's share, not by EP; with the
  term on (mixtral's 0.001), ep(2) equals ddp(2) at 1e-5 instead (with activation checkpointing); on 4 ranks, two
  EP groups of 2 (each expert on two ranks) equal single at 1e-5 (extended set);
- the checkpoint holds each rank's experts under the whole model's names: resume on 2 ranks continues bit-identically,
  and the export is the whole model (4 experts per layer) with the trained run's logits;
- impossible combinations are one line and exit 2 before launch; the estimate divides the experts by ep.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import (
    assert_losses_close,
    cli_in_process,
    compose,
    losses,
    only_run_dir,
    read_metrics,
    run_cli,
    tiny_overrides,
    train_ok,
)
from test_own_tokenizer import own_checkpoint

STEPS = 4
EXPERTS, TOP_K, HIDDEN, LAYERS, SEQ = 4, 2, 32, 2, 32


@pytest.fixture(scope="module")
def moe(corpus, tmp_path_factory) -> Path:
    """qwen3_moe with the router's auxiliary loss left out of the loss (its metric stays): see the module's doc."""
    path = own_checkpoint(tmp_path_factory.mktemp("moe") / "qwen3_moe", corpus, family="qwen3_moe")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"router_aux_loss_coef": 0.0}, indent=2))
    return path


def _args(moe: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={moe}", "data=text", f"data.paths=[{corpus}]", f"data.cache_dir={cache}",
            f"data.seq_len={SEQ}", f"max_steps={STEPS}", f"eval_every={STEPS}", "eval_batches=1", "checkpoint.every=2",
            "logging.progress=false", "optimizer.lr=1e-2", "schedule.warmup_steps=1", "device=cpu", *extra]


LAYOUTS = {"single": ["batch_size=4"],  # the same global batch of 4 sequences in each
           "ddp": ["batch_size=2", "parallel=ddp", "parallel.ep=2", "launcher.nproc_per_node=2"],
           "fsdp": ["batch_size=2", "parallel=fsdp", "parallel.ep=2", "launcher.nproc_per_node=2"]}


@pytest.fixture(scope="module")
def run(moe, corpus, cache_dir, tmp_path_factory):
    """run(name) -> the run directory of LAYOUTS[name], trained once per module (on first use)."""
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            tmp = tmp_path_factory.mktemp(name)
            train_ok(tmp, *_args(moe, corpus, cache_dir, *LAYOUTS[name]))
            done[name] = only_run_dir(tmp / "outputs")
        return done[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", pytest.param("fsdp", marks=pytest.mark.extended)])
def test_expert_parallel_equals_single_with_the_expert_load_and_a2a_bytes(layout, run):
    """fsdp + ep: FSDP shards the rest over the same 2 ranks (extended set: the file's default run stays < 3 min)."""
    assert_losses_close(losses(run(layout)), losses(run("single")), steps=STEPS, rtol=1e-5, what=f"{layout} ep(2)")
    first, single = read_metrics(run(layout))[0], read_metrics(run("single"))[0]
    assert first["expert_load"] == single["expert_load"]  # same weights, same tokens: the same routing
    assert all(sum(layer) == 4 * SEQ * TOP_K for layer in first["expert_load"])
    # each (token, expert) pair for the other rank crosses twice forward (dispatch, combine) and twice backward:
    # at most every pair of the rank's 2 x 32 tokens, in fp32, per layer (+ the counts)
    most = LAYERS * 4 * (2 * SEQ * TOP_K) * HIDDEN * 4 + LAYERS * (EXPERTS // 2) * 8
    assert all(0 < r["a2a_bytes_per_rank"] <= most for r in read_metrics(run(layout)) if "loss" in r)
    assert "a2a_bytes_per_rank" not in single


@pytest.mark.slow
@pytest.mark.extended
def test_two_expert_parallel_groups_on_4_ranks_equal_single(run, moe, corpus, cache_dir, tmp_path):
    """ep=2 on 4 ranks: two groups of 2 ranks each hold all 4 experts; each expert's gradient is summed over its
    2 replicas, then averaged like the rest."""
    train_ok(tmp_path, *_args(moe, corpus, cache_dir, "batch_size=1", "parallel=ddp", "parallel.ep=2",
                              "launcher.nproc_per_node=4"))
    four = only_run_dir(tmp_path / "outputs")
    assert_losses_close(losses(four), losses(run("single")), steps=STEPS, rtol=1e-5, what="ddp(4) ep(2)")
    assert "global batch 4 sequences" in (four / "train.log").read_text()


@pytest.mark.slow
def test_resume_under_expert_parallel_is_bit_identical(run, tmp_path, capsys):
    """Each rank's experts are DTensor shards of the whole model's tensors in the DCP checkpoint: a copy stopped at
    step 2 resumes on 2 ranks and repeats steps 3-4 exactly. Resuming ddp without ep is refused (its optimizer's
    parameter groups are split by DTensor-ness under ep)."""
    original, copy = run("ddp"), tmp_path / "copy"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("step-*"))
    shutil.copytree(original / "checkpoints" / "step-2", copy / "checkpoints" / "step-2")
    code, stderr = cli_in_process(capsys, "resume", str(copy), "parallel.ep=1")
    assert code == 2 and "was trained with parallel.ep=2" in stderr and stderr.count("\n") == 1, stderr
    result = run_cli("resume", str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(copy)] == list(range(1, STEPS + 1))
    assert losses(copy) == losses(original)


@pytest.mark.slow
def test_the_export_of_an_expert_parallel_run_is_the_whole_model(run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from effitrain.engine.export import _run_parts, load_trained_model

    result = run_cli("export", str(run("ddp")), "--out", str(tmp_path / "export"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert hf.model.layers[0].mlp.experts.gate_up_proj.shape[0] == EXPERTS  # every rank's experts, gathered
    cfg, checkpoint, tokenizer = _run_parts(run("ddp"), step=None)  # the checkpoint read back in one process
    ours = load_trained_model(cfg, checkpoint, vocab_size=tokenizer.get_vocab_size())
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x").ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranks, extra, message", [
    (3, ["parallel.ep=3"], "parallel.ep=3 does not divide the model's 4 experts per layer"),
    (2, ["parallel.ep=4"], "parallel.ep=4 does not divide the 2 data-parallel ranks"),
    (2, ["parallel.ep=2", "parallel.compile=true"], "parallel.compile=true with parallel.ep=2 is not built"),
    (2, ["parallel.ep=2", "optimizer=muon"], "optimizer=muon runs under parallel=single or ddp, not ddp with "
                                             "parallel.ep=2: it needs whole weight matrices"),
    (2, ["parallel.ep=2", "optimizer=zero1"], "optimizer=zero1 and parallel=ddp cannot run together: under "
                                              "parallel.ep>1 ZeRO-1 would broadcast one rank's experts"),
    (2, ["parallel.ep=2", "compression=grad-fp16"], "compression=grad-fp16 runs under parallel=ddp, not ddp with "
                                                    "parallel.ep=2"),
    (2, ["parallel.ep=2", "dense"], "parallel.ep=2 needs a mixture-of-experts model with an expert-parallel plan; "
                                    "the model ('llama') is dense"),
], ids=["experts", "world", "compile", "muon", "zero1", "grad-hook", "dense"])
def test_impossible_expert_parallel_layouts_are_one_line_before_launch(ranks, extra, message, moe, corpus, cache_dir,
                                                                       tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = ["parallel=ddp", f"launcher.nproc_per_node={ranks}", *(a for a in extra if a != "dense")]
    args = tiny_overrides(corpus, cache_dir, "device=cpu", *layout) if "dense" in extra else \
        _args(moe, corpus, cache_dir, *layout)
    code, stderr = cli_in_process(capsys, "train", *args)
    assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "outputs").exists()  # refused before anything was written


def test_the_estimate_divides_the_experts_by_ep(moe, corpus, cache_dir):
    from effitrain.estimate import estimate

    def memory(*layout: str) -> dict:
        cfg = compose(_args(moe, corpus, cache_dir, "batch_size=2", "launcher.nproc_per_node=2", *layout))
        return estimate(cfg, timing=False).memory

    config = json.loads((moe / "config.json").read_text())
    experts = LAYERS * EXPERTS * 3 * config["moe_intermediate_size"] * HIDDEN  # gate_up [2I, H] + down [H, I]
    whole, ep = memory("parallel=ddp"), memory("parallel=ddp", "parallel.ep=2")
    assert whole["parameters"] - ep["parameters"] == experts // 2 * 4  # fp32: half the experts leave each rank
    assert whole["ddp_buckets"] - ep["ddp_buckets"] == experts * 4  # and DDP reduces none of them
    fsdp, fsdp_ep = memory("parallel=fsdp"), memory("parallel=fsdp", "parallel.ep=2")
    assert fsdp["parameters"] == fsdp_ep["parameters"]  # 1/2 either way: FSDP's shards, or EP's experts
    assert fsdp["fsdp_gathered_params"] - fsdp_ep["fsdp_gathered_params"] == experts * 4  # experts never gathered


@pytest.mark.slow
@pytest.mark.extended
def test_mixtral_under_expert_parallel_with_activation_checkpointing_equals_ddp(corpus, cache_dir, tmp_path):
    """The same plan and dispatch serve mixtral (num_local_experts), its router loss on (each rank's own, as under
    ddp); activation checkpointing recomputes a block's all-to-alls in backward."""
    mixtral = own_checkpoint(tmp_path / "mixtral", corpus, family="mixtral")
    out = {}
    for name, layout in {"ddp": ["batch_size=2", "parallel=ddp", "launcher.nproc_per_node=2"],
                         "ep": [*LAYOUTS["ddp"], "parallel.activation_checkpointing=full"]}.items():
        (tmp_path / name).mkdir()
        train_ok(tmp_path / name, *_args(mixtral, corpus, cache_dir, *layout))
        out[name] = only_run_dir(tmp_path / name / "outputs")
    assert_losses_close(losses(out["ep"]), losses(out["ddp"]), steps=STEPS, rtol=1e-5, what="mixtral ddp ep(2)")
    assert all(r["a2a_bytes_per_rank"] > 0 for r in read_metrics(out["ep"]) if "loss" in r)
