"""A model.pretrained checkpoint loaded shard by shard (issue 23, item 5): under fsdp and tp each rank reads only its
own slices of the safetensors files, and gets exactly what the whole load gives; what cannot be sliced is loaded
whole, with the reason in the log; a damaged shard is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose, only_run_dir, read_metrics, run_cli, train_ok
from test_own_tokenizer import own_tokenizer, run_args

sys.path.insert(0, str(REPO / "scripts"))
import bench_load  # noqa: E402  (the bench's worker is the check's worker)


def sharded_llama(out: Path, corpus: Path, *, seed: int = 0) -> Path:
    """A tiny llama checkpoint with its own tokenizer, saved in 20 kB safetensors shards with an index. Two kv heads:
    tp(2) splits them (test_own_tokenizer's checkpoints have one)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    size = own_tokenizer(out, corpus)
    config = LlamaConfig(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, eos_token_id=1, bos_token_id=0)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, max_shard_size="20KB")
    assert _files(out) > 3 and (out / "model.safetensors.index.json").is_file()
    return out


def _files(path: Path) -> int:
    return len(list(path.glob("model-*.safetensors")))


def tied_gpt2(out: Path) -> Path:
    """A tiny gpt2 checkpoint (Conv1D weights, fused c_attn, LM head tied to the embedding) in one file."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64, eos_token_id=1, bos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama(corpus, tmp_path_factory) -> Path:
    return sharded_llama(tmp_path_factory.mktemp("llama"), corpus)


def test_each_rank_gets_exactly_the_whole_load_s_parameters_under_every_sharding_layout(llama, tmp_path):
    """2 gloo ranks build the model as `effitrain train` does; every parameter gathered (full_tensor) and every
    buffer equal the whole load's bit for bit: llama in several shard files, gpt2 tied and linearised."""
    gpt2 = tied_gpt2(tmp_path / "gpt2")
    # on 2 ranks fsdp-tp is tp=2 under a dp_shard mesh of 1, hsdp 2 replicas of 1 shard: 2-D DTensors, each rank
    # reading the slice its placements give (Shard over Shard, Replicate over Shard)
    runs = [(model, layout, "shards") for model in (llama, gpt2) for layout in ("fsdp", "tp", "fsdp-tp")]
    runs.append((llama, "hsdp", "shards"))
    results = bench_load.measure(runs, tmp=tmp_path, check=True)
    for (model, layout, _), ranks in zip(runs, results, strict=True):
        for r in ranks:
            assert r["sliced"], (model.name, layout, r["log"])  # the sliced path ran, not the fallback
            assert r["mismatches"] == [], (model.name, layout, r["rank"], r["mismatches"])


@pytest.mark.extended  # two 2-rank runs through the real command
def test_fsdp_and_tp_first_losses_equal_single_s_whole_load(llama, corpus, tmp_path):
    from effitrain.engine.train import run

    args = [a for a in run_args(llama, corpus, tmp_path / "cache", "max_steps=1", "eval_every=10")
            if not a.startswith("batch_size=")]
    run(compose([*args, "batch_size=4"]), tmp_path / "single")
    single = read_metrics(tmp_path / "single")[0]["loss"]
    # batch_size is per data-parallel rank: fsdp's 2 ranks read 2 sequences each, tp's one group all 4
    for layout, batch in (("fsdp", 2), ("tp", 4)):
        (tmp_path / layout).mkdir()
        result = train_ok(tmp_path / layout, *args, f"batch_size={batch}", f"parallel={layout}",
                          "launcher.nproc_per_node=2")
        log = (only_run_dir(tmp_path / layout / "outputs") / "train.log").read_text()
        assert f"each rank reads its own shards of {_files(llama)} safetensors file(s)" in log, result.stderr[-2000:]
        loss = read_metrics(only_run_dir(tmp_path / layout / "outputs"))[0]["loss"]
        assert abs(loss - single) <= 1e-6 * abs(single), (layout, loss, single)


def test_a_distillation_teacher_is_sliced_too(llama, corpus, tmp_path):
    """fsdp in one process (a real one-rank group, DTensor parameters): student and teacher read shard by shard give
    the first loss (LM loss + the KL to another model) of single's whole loads."""
    from effitrain.engine.train import run

    teacher = sharded_llama(tmp_path / "teacher", corpus, seed=3)
    args = run_args(llama, corpus, tmp_path / "cache", "max_steps=1", "eval_every=10", "compression=distill",
                    f"compression.distill.teacher={teacher}")
    run(compose(args), tmp_path / "single")
    run(compose([*args, "parallel=fsdp"]), tmp_path / "fsdp")
    log = (tmp_path / "fsdp" / "train.log").read_text()
    assert f"compression.distill.teacher={teacher}: each rank reads its own shards" in log, log
    assert f"model.pretrained={llama}: each rank reads its own shards" in log
    single, fsdp = (read_metrics(tmp_path / name)[0]["loss"] for name in ("single", "fsdp"))
    assert abs(fsdp - single) <= 1e-6 * abs(single), (fsdp, single)


def test_sliced_load_of_plain_tensors_is_the_whole_load(tmp_path):
    """One process, no mesh: SlicedLoad fills whole tensors (gpt2's transposed Conv1Ds and split c_attn) with
    what from_pretrained + linearise_gpt2 give, bit for bit; a corrupted read would not pass."""
    from effitrain.base.converters import ConverterChain
    from effitrain.model.build import build_model
    from effitrain.model.load import build_pretrained

    gpt2 = tied_gpt2(tmp_path / "gpt2")
    cfg = compose([f"model.pretrained={gpt2}"]).model
    model, sliced = build_pretrained(cfg, vocab_size=300, max_seq_len=64, converters=ConverterChain([]))
    assert sliced is not None and all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # as _materialise re-ties
    sliced(model)
    whole = build_model(cfg, vocab_size=300, max_seq_len=64)
    ours = dict(model.named_parameters())
    assert set(ours) == set(dict(whole.named_parameters()))
    for name, p in whole.named_parameters():
        assert torch.equal(ours[name], p), name


def test_what_cannot_be_sliced_is_loaded_whole_and_says_why(llama, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from effitrain.base.converters import ConverterChain
    from effitrain.compression.lora import Lora
    from effitrain.model.load import build_pretrained

    bin_only = tmp_path / "bin"
    model = AutoModelForCausalLM.from_pretrained(llama)
    bin_only.mkdir()
    (bin_only / "config.json").write_text((llama / "config.json").read_text())
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin")
    renamed = tmp_path / "renamed"  # a checkpoint of the base model: keys without "model." (transformers maps them)
    model.model.save_pretrained(renamed)
    lora = ConverterChain([Lora(rank=2, alpha=4.0, dropout=0.0, target_modules=["q_proj"])])
    cases = {bin_only: (ConverterChain([]), "pytorch_model.bin files, which cannot be read in slices"),
             renamed: (ConverterChain([]), "is not in its safetensors files"),
             llama: (lora, "Lora converts the model from its real weights")}
    for path, (converters, why) in cases.items():
        caplog.clear()
        with caplog.at_level("INFO", logger="effitrain"):
            built, sliced = build_pretrained(compose([f"model.pretrained={path}"]).model, vocab_size=300,
                                             max_seq_len=64, converters=converters)
        assert sliced is None and not any(p.is_meta for p in built.parameters()), path
        assert "every rank loads the whole checkpoint" in caplog.text and why in caplog.text, caplog.text


def test_a_missing_or_truncated_shard_is_one_line(llama, corpus, tmp_path):
    """A shard the index names but that is not there, or one cut short: found where the ranks load (the checks
    before launch see a weights index), reported as one line, exit 2, no worker traceback."""
    from effitrain.model import ModelError
    from effitrain.model.load import Checkpoint

    index = json.loads((llama / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    missing = _copy(llama, tmp_path / "missing")
    (missing / last).unlink()
    with pytest.raises(ModelError, match=f"names {last}, which is not there"):
        Checkpoint(missing, what="model.pretrained=x")
    cut = _copy(llama, tmp_path / "cut")
    (cut / last).write_bytes((llama / last).read_bytes()[:-100])
    result = run_cli("train", *run_args(cut, corpus, tmp_path / "cache"), "parallel=fsdp",
                     "launcher.nproc_per_node=2", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"model.pretrained={cut}: cannot load the model" in lines[0] and f"{last} is not a readable" in lines[0]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst
