"""Bring your own model (issue 23): tiny random checkpoints of transformers' own families, each with a tokenizer of its
own and embeddings exactly its size, trained through the real CLI with no other override than model.pretrained.

- single: every family trains (one `-m` sweep over the checkpoints: one process), and its export loads in plain
  transformers with the trained model's logits and the tokenizer's identity (EOS, specials, chat template);
- tp(2) (and sequence parallel for the families whose blocks differ most) equals single at 1e-5 for every family
  with a tensor-parallel plan -- transformers' base_model_tp_plan, gpt2 effitrain's own; fsdp(2) for the MoE
  families; the MoE families are refused under tp in one line (their experts are in no TP plan);
- MoE runs add the router's auxiliary loss and report the expert load; FLOPs count the active experts only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import assert_losses_close, compose, losses, only_run_dir, read_metrics, run_cli, train_ok
from test_own_tokenizer import FAMILIES, TEMPLATE, own_checkpoint

STEPS = 3
DENSE = ["llama", "qwen3", "mistral", "gemma3_text", "phi3", "olmo2", "gpt2"]
MOE = ["qwen3_moe", "mixtral"]
ALL = DENSE + MOE
assert set(ALL) == {*FAMILIES, "gpt2"}


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: own_checkpoint(root / family, corpus, family=family) for family in ALL}


def _args(corpus: Path, cache: Path, *extra: str) -> list[str]:
    return ["data=text", f"data.paths=[{corpus}]", f"data.cache_dir={cache}", "data.seq_len=32", "batch_size=4",
            f"max_steps={STEPS}", f"eval_every={STEPS}", "eval_batches=1", "logging.progress=false",
            "optimizer.lr=1e-2", "schedule.warmup_steps=1", *extra]


@pytest.fixture(scope="module")
def singles(checkpoints, corpus, cache_dir, tmp_path_factory) -> dict[str, Path]:
    """family -> its single-process run directory (one sweep, one process)."""
    tmp = tmp_path_factory.mktemp("singles")
    train_ok(tmp, "-m", f"model.pretrained={','.join(str(p) for p in checkpoints.values())}",
             *_args(corpus, cache_dir))
    out = {}
    for job in (tmp / "outputs" / "multirun").glob("*/*/[0-9]*"):
        pretrained = Path(OmegaConf.load(job / ".hydra" / "config.yaml").model.pretrained)
        out[pretrained.name] = job
    assert sorted(out) == sorted(ALL)
    return out


def _layout_run(tmp: Path, checkpoint: Path, corpus: Path, cache: Path, *layout: str, nproc: int = 2) -> Path:
    train_ok(tmp, f"model.pretrained={checkpoint}", *_args(corpus, cache), f"launcher.nproc_per_node={nproc}",
             "device=cpu", *layout)
    return only_run_dir(tmp / "outputs")


def test_every_family_trains_and_is_named_by_its_type(singles, checkpoints):
    for family, run in singles.items():
        env = json.loads((run / "env.json").read_text())
        assert env["model"]["model_type"] == family and env["model"]["pretrained"] == str(checkpoints[family])
        assert f"model {family} (" in (run / "train.log").read_text()  # not the option's name ("tiny")
        assert len(losses(run)) == STEPS


@pytest.mark.parametrize("family", ALL)
def test_the_export_loads_in_plain_transformers_with_the_same_logits_and_tokenizer(family, singles, checkpoints,
                                                                                   tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from effitrain.engine.export import _run_parts, load_trained_model

    run = singles[family]
    export = tmp_path / "export"
    result = run_cli("export", str(run), "--out", str(export), "--max-shard-size", "100KB", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (export / "model.safetensors.index.json").is_file()  # sharded: > 100 KB of weights
    tok = AutoTokenizer.from_pretrained(export)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|eot|>", "<|bos|>", "<|pad|>")
    assert tok.chat_template == TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|bos|>user: hi<|eot|>"
    assert GenerationConfig.from_pretrained(export).eos_token_id == tok.convert_tokens_to_ids("<|eot|>")
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    original = json.loads((checkpoints[family] / "config.json").read_text())
    written = json.loads((export / "config.json").read_text())
    assert written["dtype"] == "float32" and hf.config.model_type == family
    changed = {k for k in original.keys() | written.keys() if original.get(k) != written.get(k)}
    assert changed <= {"use_cache", "transformers_version"}, changed  # every other field as the checkpoint had it
    cfg, checkpoint, tokenizer = _run_parts(run, step=None)
    ours = load_trained_model(cfg, checkpoint, vocab_size=tokenizer.get_vocab_size())
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x").ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_sample_chat_formats_the_prompt_and_stops_at_the_eos(singles, tmp_path):
    from effitrain.engine.export import sample_text

    answer = sample_text(singles["llama"], "hi", chat=True, tokens=8)
    assert "<|eot|>" not in answer and "user:" not in answer  # the answer alone
    plain = run_cli("sample", str(singles["llama"]), "--chat", "hi", "--tokens", "4", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("family", DENSE)
def test_tensor_parallel_by_the_family_s_plan_equals_single(family, singles, checkpoints, corpus, cache_dir, tmp_path):
    """colwise/rowwise (llama, mistral, gpt2), per-head q/k norms whose gradient is reduced (qwen3, gemma3),
    gathered fused projections (phi3's qkv_proj/gate_up_proj, olmo2's q/k before their whole-width norms)."""
    run = _layout_run(tmp_path, checkpoints[family], corpus, cache_dir, "parallel=tp")
    assert_losses_close(losses(run), losses(singles[family]), steps=STEPS, rtol=1e-5, what=f"{family} tp(2)")


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_sequence_parallel_by_the_family_s_plan_equals_single(family, singles, checkpoints, corpus, cache_dir,
                                                              tmp_path):
    """gemma3's four norms per block (two after the sub-layers), phi3's fused projections."""
    run = _layout_run(tmp_path, checkpoints[family], corpus, cache_dir, "parallel=tp",
                      "parallel.sequence_parallel=true")
    assert_losses_close(losses(run), losses(singles[family]), steps=STEPS, rtol=1e-5, what=f"{family} tp+sp")


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("family,layout", [("qwen3", ["parallel=fsdp-tp", "batch_size=2"]),
                                           ("phi3", ["parallel=fsdp", "batch_size=2"]),
                                           ("gemma3_text", ["parallel=ddp", "batch_size=2"]),
                                           ("gemma3_text", ["parallel=fsdp", "batch_size=2",
                                                            "parallel.activation_checkpointing=full"])],
                         ids=["qwen3-fsdp-tp", "phi3-fsdp", "gemma3-ddp", "gemma3-fsdp-ac"])
def test_other_layouts_equal_single(family, layout, singles, checkpoints, corpus, cache_dir, tmp_path):
    """fsdp-tp: the family's TP plan under FSDP2 on a 2 x 2 mesh (per-head q/k norms included). AC: a block
    recomputed in backward must not find a KV cache (gemma3's sliding-window cache grew past the sequence)."""
    run = _layout_run(tmp_path, checkpoints[family], corpus, cache_dir, *layout,
                      nproc=4 if layout[0] == "parallel=fsdp-tp" else 2)
    assert_losses_close(losses(run), losses(singles[family]), steps=STEPS, rtol=1e-5, what=f"{family} {layout[0]}")


@pytest.mark.slow
@pytest.mark.parametrize("family", MOE)
def test_moe_trains_under_fsdp_like_single_with_the_router_loss_and_expert_load(family, singles, checkpoints,
                                                                               corpus, cache_dir, tmp_path):
    """Each data-parallel rank's router loss balances its own tokens (as transformers computes it per forward), so
    fsdp(2) differs from single by that term's share: 1e-4 here (router_aux_loss_coef 0.001), not 1e-5."""
    run = _layout_run(tmp_path, checkpoints[family], corpus, cache_dir, "parallel=fsdp", "batch_size=2")
    assert_losses_close(losses(run), losses(singles[family]), steps=STEPS, rtol=1e-4, what=f"{family} fsdp(2)")
    for records in (read_metrics(run), read_metrics(singles[family])):
        step = next(r for r in records if "loss" in r)
        load = step["expert_load"]  # [layers][experts]: tokens of the global batch, k experts each
        assert len(load) == 2 and len(load[0]) == 4
        assert all(sum(layer) == 4 * 32 * 2 for layer in load)  # batch 4 x 32 tokens x 2 experts per token
        assert step["router_aux_loss"] > 0 and all(cv >= 0 for cv in step["expert_load_cv"])
    a, b = read_metrics(run)[0], read_metrics(singles[family])[0]
    assert a["expert_load"] == b["expert_load"]  # the same weights and tokens: the same routing, counted over ranks
    assert a["router_aux_loss"] == pytest.approx(b["router_aux_loss"], rel=1e-2)  # each rank's own tokens (above)


@pytest.mark.parametrize("family", MOE)
def test_moe_under_tensor_parallel_is_refused_before_launch(family, checkpoints):
    from effitrain.checks import check_all
    from effitrain.errors import UsageError

    with pytest.raises(UsageError, match=f"parallel=tp needs a tensor-parallel plan of the model's blocks: a "
                                         f"'{family}' model's experts are in no tensor-parallel plan"):
        check_all(compose([f"model.pretrained={checkpoints[family]}", "parallel=tp", "launcher.nproc_per_node=2",
                           "device=cpu"]))


def test_router_aux_loss_is_in_the_loss(checkpoints):
    """The loss a MoE step optimises is the cross entropy plus router_aux_loss_coef x the router's loss."""
    import torch
    import torch.nn.functional as F

    from effitrain.engine.loop import RouterLoad, lm_loss
    from effitrain.model.build import load_pretrained

    model = load_pretrained(checkpoints["qwen3_moe"], what="qwen3_moe", dtype=torch.float32)
    batch = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    router = RouterLoad.of(model)
    loss = lm_loss(model, batch, router=router)
    ce = F.cross_entropy(model(input_ids=batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
    assert router.coef == model.config.router_aux_loss_coef > 0
    torch.testing.assert_close(loss, ce + router.coef * router.aux[0])
    assert router.counts.sum(dim=1).tolist() == [2 * 8 * 2] * 2  # tokens x experts per token, each layer
    assert RouterLoad.of(load_pretrained(checkpoints["llama"], what="llama", dtype=torch.float32)) is None
