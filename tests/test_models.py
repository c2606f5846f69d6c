"""Models from transformers configs, and a local pretrained checkpoint loaded without any download."""

from __future__ import annotations

import pytest
import torch

from conftest import compose, read_metrics
from effitrain.models import ModelError, build_model
from effitrain.train import run


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
