"""A model.pretrained checkpoint trains with its own tokenizer, untouched (issue 23, item 1), and its export keeps
the tokenizer's identity (item 6): tiny random checkpoints of transformers' own families, each with a byte-level BPE
of its own (<|bos|>, <|eot|>, <|pad|>, a chat template) and embeddings exactly the tokenizer's size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose, only_run_dir, run_cli, train_ok

TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eot|>{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>assistant: {% endif %}")
SPECIALS = ["<|bos|>", "<|eot|>", "<|pad|>"]


def own_tokenizer(out: Path, corpus: Path, *, vocab_size: int = 300, eos: str | None = "<|eot|>",
                  add_bos: bool = False) -> int:
    """A byte-level BPE trained on a few lines of the corpus, saved as out/tokenizer.json with a tokenizer_config.json
    (eos, bos, pad, chat template) as a Hugging Face model directory has them; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = [line for f in sorted(corpus.iterdir())[:3] for line in f.read_text().splitlines()[:200]]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "pad_token": "<|pad|>",
              "add_bos_token": add_bos, "chat_template": TEMPLATE, "model_max_length": 64}
    if eos:
        config["eos_token"] = eos
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eot|>",
                                                             "pad_token": "<|pad|>"}))
    return tok.get_vocab_size()


# transformers' config class and family-specific keys of each family the tests build (d=32, 2 layers, 4 heads, 2
# kv heads)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "output_router_logits": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True}),
}


def own_checkpoint(out: Path, corpus: Path, *, family: str = "llama", embeddings: int | None = None, **tok) -> Path:
    """A tiny random checkpoint of `family` (transformers' own config class) with its own tokenizer; its vocab_size
    the tokenizer's exactly, unless `embeddings` says otherwise."""
    import transformers
    from transformers import AutoModelForCausalLM

    size = own_tokenizer(out, corpus, **tok)
    ids = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    eot = next(t["id"] for t in ids if t["content"] == "<|eot|>")
    bos = next(t["id"] for t in ids if t["content"] == "<|bos|>")
    pad = next(t["id"] for t in ids if t["content"] == "<|pad|>")
    if family == "gpt2":
        # no dropout (GPT-2's default is 0.1): runs of two layouts draw different masks, and the tests compare them
        config = transformers.GPT2Config(vocab_size=embeddings or size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         eos_token_id=eot, bos_token_id=bos, tie_word_embeddings=False, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        name, extra = FAMILIES[family]
        config = getattr(transformers, name)(
            vocab_size=embeddings or size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=eot,
            bos_token_id=bos, pad_token_id=pad, tie_word_embeddings=False, **extra)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def run_args(model: Path, corpus: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={model}", "data=text", f"data.paths=[{corpus}]", f"data.cache_dir={cache_dir}",
            "data.seq_len=32", "batch_size=2", "max_steps=2", "eval_every=2", "eval_batches=1",
            "logging.progress=false", *extra]


def test_the_model_s_own_tokenizer_is_the_default_and_nothing_is_appended(corpus, tmp_path):
    from effitrain.data import run_data_config, tokenizer_specials
    from effitrain.data.prepare import prepare_data

    model = own_checkpoint(tmp_path / "m", corpus)
    cfg = compose(run_args(model, corpus, tmp_path / "cache"))
    assert cfg.data.tokenizer is None and run_data_config(cfg).tokenizer == str(model / "tokenizer.json")
    specials = tokenizer_specials(model / "tokenizer.json")
    assert (specials.eos, specials.bos_id) == ("<|eot|>", None)
    data = prepare_data(run_data_config(cfg))
    size = json.loads((model / "config.json").read_text())["vocab_size"]
    assert data.tokens.vocab_size == size  # no <|endoftext|> appended
    assert data.tokens.meta["eos_id"] == specials.eos_id
    stream = np.asarray(data.tokens.train)
    assert stream.max() < size and (stream == specials.eos_id).sum() > 0


def test_bos_is_prepended_where_the_tokenizer_config_says_so_and_the_cache_is_keyed_by_it(corpus, tmp_path):
    from effitrain.data import run_data_config
    from effitrain.data.prepare import prepare_data

    plain = own_checkpoint(tmp_path / "plain", corpus)
    with_bos = own_checkpoint(tmp_path / "bos", corpus, add_bos=True)
    assert (plain / "tokenizer.json").read_bytes() == (with_bos / "tokenizer.json").read_bytes()
    a = prepare_data(run_data_config(compose(run_args(plain, corpus, tmp_path / "cache"))))
    b = prepare_data(run_data_config(compose(run_args(with_bos, corpus, tmp_path / "cache"))))
    assert a.tokens.directory != b.tokens.directory  # the same tokenizer.json, another tokenizer_config: own cache
    bos = b.tokens.meta["bos_id"]
    assert bos is not None and a.tokens.meta["bos_id"] is None
    assert b.tokens.train[0] == bos and (np.asarray(a.tokens.train) == bos).sum() == 0
    eos = np.flatnonzero(np.asarray(b.tokens.train) == b.tokens.meta["eos_id"])
    assert all(b.tokens.train[i + 1] == bos for i in eos[:-1])  # every document starts with it
    assert b.tokens.meta["train_tokens"] == a.tokens.meta["train_tokens"] + len(eos)


def test_a_tokenizer_with_no_eos_is_one_line(corpus, tmp_path):
    model = own_checkpoint(tmp_path / "m", corpus, eos=None)
    config = json.loads((model / "config.json").read_text())
    config.pop("eos_token_id")
    (model / "config.json").write_text(json.dumps(config))
    (model / "generation_config.json").unlink()
    result = run_cli("train", *run_args(model, corpus, tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no EOS token" in result.stderr and "set eos_token" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_tokenizer_bigger_than_the_embeddings_is_one_line_before_launch(corpus, tmp_path):
    size = own_tokenizer(tmp_path / "probe", corpus)
    model = own_checkpoint(tmp_path / "m", corpus, embeddings=size - 8)
    result = run_cli("train", *run_args(model, corpus, tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"has {size - 8} embeddings but the tokenizer of model.pretrained" in result.stderr
    assert f"has {size} tokens" in result.stderr
    assert not (tmp_path / "outputs").exists()  # refused before any run directory or worker


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_pretrained_trains_with_its_tokenizer_and_the_export_keeps_its_identity(family, corpus, tmp_path):
    """mistral: its EOS only in config.json (no eos_token in tokenizer_config.json, no generation_config.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = own_checkpoint(tmp_path / "m", corpus, family=family, eos=None if family == "mistral" else "<|eot|>")
    if family == "mistral":
        (model / "generation_config.json").unlink()
    size = json.loads((model / "config.json").read_text())["vocab_size"]
    train_ok(tmp_path, *run_args(model, corpus, tmp_path / "cache"))  # no data.tokenizer
    run_dir = only_run_dir(tmp_path / "outputs")
    assert (run_dir / "tokenizer_config.json").read_bytes() == (model / "tokenizer_config.json").read_bytes()
    result = run_cli("export", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    export = run_dir / "export" / "step-2"
    tok = AutoTokenizer.from_pretrained(export)
    eot = tok.convert_tokens_to_ids("<|eot|>")
    assert tok.eos_token == "<|eot|>"  # mistral: from its special_tokens_map.json, kept as it was
    assert tok.pad_token == "<|pad|>" and tok.bos_token == "<|bos|>"
    assert len(tok) == size
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|bos|>user: hi<|eot|><|bos|>assistant: "
    assert GenerationConfig.from_pretrained(export).eos_token_id == eot
    hf = AutoModelForCausalLM.from_pretrained(export)
    assert hf.config.vocab_size == size and hf.config.model_type == family  # the model's vocab unchanged
