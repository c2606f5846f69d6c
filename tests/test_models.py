"""Models from transformers configs, and a local pretrained checkpoint loaded without any download."""

from __future__ import annotations

import pytest
import torch

from conftest import compose, read_metrics
from effitrain.engine.train import run
from effitrain.model.build import ModelError, build_model, init_weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny llama saved as a local Hugging Face checkpoint directory (config.json + safetensors)."""
    cfg = compose(["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=512, max_seq_len=32)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_pretrained_loads_the_saved_weights(checkpoint):
    path, saved = checkpoint
    cfg = compose([f"model.pretrained={path}"])
    loaded = build_model(cfg.model, vocab_size=512, max_seq_len=32).state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_pretrained_with_too_small_vocab_is_a_usage_error(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ModelError, match="512 embeddings but the tokenizer has 4096 tokens"):
        build_model(compose([f"model.pretrained={path}"]).model, vocab_size=4096, max_seq_len=32)


def test_training_starts_from_the_checkpoint(checkpoint, tiny, tmp_path):
    path, _ = checkpoint
    run(compose([*tiny("max_steps=2"), f"model.pretrained={path}"]), tmp_path / "a")
    run(compose(tiny("max_steps=2")), tmp_path / "b")
    pretrained, fresh = read_metrics(tmp_path / "a")[0]["loss"], read_metrics(tmp_path / "b")[0]["loss"]
    assert pretrained != fresh  # different starting weights, same data


def test_gpt2_runs_as_linears_and_a_gpt2_checkpoint_keeps_its_logits(tmp_path):
    """GPT-2's Conv1D layers (fused q|k|v) become Linears (separate q, k, v) for tensor parallelism: same parameter
    and FLOP counts, and a transformers GPT-2 checkpoint, transposed on load, gives transformers' own logits."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from effitrain.base.flops import model_flops_per_token
    from effitrain.model.build import QKV, count_params, hf_config

    cfg = compose(["model=gpt2-124m", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
                   "model.intermediate_size=64"])
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(hf_config(cfg.model, vocab_size=512, max_seq_len=32),
                                                 attn_implementation="sdpa").eval()
    reference.save_pretrained(tmp_path)
    loaded = build_model(compose([f"model.pretrained={tmp_path}"]).model, vocab_size=512, max_seq_len=32).eval()
    built = build_model(cfg.model, vocab_size=512, max_seq_len=32, meta=True)
    for model in (loaded, built):
        assert not any(isinstance(m, Conv1D) for m in model.modules())
        assert isinstance(model.transformer.h[0].attn.c_attn, QKV)
        assert count_params(model) == count_params(reference)
        assert model_flops_per_token(model, seq_len=32) == model_flops_per_token(reference, seq_len=32)
    with torch.no_grad():  # GPT-2's init rule under the new names: output projections' std / sqrt(2 x layers)
        init_weights(built.to_empty(device="cpu"), cfg=cfg.model, seed=0)
        attn = built.transformer.h[0].attn
        assert float(attn.c_proj.weight.std() / attn.c_attn.q_proj.weight.std()) == pytest.approx(0.5, rel=0.15)
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, reference(input_ids=tokens).logits,
                                   rtol=1e-5, atol=1e-5)
