"""The arithmetic behind the metrics, pinned to numbers worked out by hand, not to the keys' presence.

- FLOPs per token: 6N + 12·L·d·T (PaLM appendix B), N counted here term by term from the architecture
  (every weight a token's forward multiplies by: attention with GQA-sized k/v, the MLP, norms, biases, the LM head;
  not the embedding lookups), for llama and gpt2, tied and untied, at odd sizes so a wrong term shows.
- Every step record's tflops_per_device and mfu_pct follow from that count, tokens_per_s, the world size and
  env.json's peak, exactly.
- The TensorBoard event file, read back by TensorBoard's own reader, holds what metrics.jsonl holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import compose, read_metrics, tiny_overrides


def llama_flops_per_token(*, d: int, layers: int, heads: int, kv_heads: int, ff: int, vocab: int, seq: int) -> int:
    head_dim = d // heads
    q, o = d * d, d * d  # no biases in llama's projections
    k = v = d * kv_heads * head_dim  # grouped-query attention: k and v project to kv_heads heads only
    mlp = 3 * d * ff  # gate, up, down
    norms = 2 * d  # RMSNorm weights before attention and before the MLP
    n = layers * (q + k + v + o + mlp + norms) + d + vocab * d  # + final norm + LM head (tied or not: it multiplies)
    return 6 * n + 12 * layers * d * seq


def gpt2_flops_per_token(*, d: int, layers: int, ff: int, vocab: int, seq: int) -> int:
    qkv = 3 * (d * d + d)  # q, k, v with biases
    attn_out = d * d + d
    mlp = (d * ff + ff) + (ff * d + d)  # c_fc, c_proj with biases
    norms = 2 * (d + d)  # two LayerNorms (weight and bias) per block
    n = layers * (qkv + attn_out + mlp + norms) + 2 * d + vocab * d  # + ln_f + LM head; wte, wpe are lookups
    return 6 * n + 12 * layers * d * seq


def _model_flops(overrides: list[str], *, vocab: int, seq: int) -> float:
    from effitrain.base.flops import model_flops_per_token
    from effitrain.model.build import build_model

    model = build_model(compose(overrides).model, vocab_size=vocab, max_seq_len=seq, meta=True)
    return model_flops_per_token(model, seq_len=seq)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kv_heads", [6, 2], ids=["mha", "gqa"])
def test_llama_flops_per_token_is_the_hand_count(tied, kv_heads):
    d, layers, heads, ff, vocab, seq = 60, 3, 6, 92, 263, 23
    overrides = ["model=tiny", f"model.hidden_size={d}", f"model.num_layers={layers}", f"model.num_heads={heads}",
                 f"model.num_kv_heads={kv_heads}", f"model.intermediate_size={ff}", f"model.tie_embeddings={tied}"]
    expected = llama_flops_per_token(d=d, layers=layers, heads=heads, kv_heads=kv_heads, ff=ff, vocab=vocab, seq=seq)
    assert _model_flops(overrides, vocab=vocab, seq=seq) == expected


def test_llama_default_mlp_width_is_4d():
    d, layers, heads, vocab, seq = 44, 2, 2, 131, 17  # RoPE needs an even head dim: 22
    overrides = ["model=tiny", f"model.hidden_size={d}", f"model.num_layers={layers}", f"model.num_heads={heads}",
                 "model.intermediate_size=null"]
    expected = llama_flops_per_token(d=d, layers=layers, heads=heads, kv_heads=heads, ff=4 * d, vocab=vocab, seq=seq)
    assert _model_flops(overrides, vocab=vocab, seq=seq) == expected


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("ff", [92, None], ids=["ff92", "ff-default"])
def test_gpt2_flops_per_token_is_the_hand_count(tied, ff):
    d, layers, heads, vocab, seq = 44, 3, 4, 263, 23
    overrides = ["model=gpt2-124m", f"model.hidden_size={d}", f"model.num_layers={layers}", f"model.num_heads={heads}",
                 f"model.intermediate_size={'null' if ff is None else ff}", f"model.tie_embeddings={tied}"]
    expected = gpt2_flops_per_token(d=d, layers=layers, ff=ff or 4 * d, vocab=vocab, seq=seq)
    assert _model_flops(overrides, vocab=vocab, seq=seq) == expected


def family_flops_per_token(family: str, *, d: int, layers: int, heads: int, kv_heads: int, head_dim: int, ff: int,
                           vocab: int, seq: int, window: int | None = None, experts: int = 0, top_k: int = 0,
                           moe_ff: int = 0) -> int:
    """A transformers family's count by hand: head_dim apart from d / heads (qwen3, gemma3), per-head q/k norms
    (qwen3, gemma3) or whole-width ones (olmo2), gemma3's four block norms and sliding window, phi3's fused q/k/v and
    gate/up (the same weights as separate ones), a MoE MLP of which a token runs through top_k of the experts plus
    the router. Untied head, no biases."""
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    attention = d * q_width + 2 * d * kv_width + q_width * d
    qk_norms = {"qwen3": 2 * head_dim, "gemma3_text": 2 * head_dim, "qwen3_moe": 2 * head_dim,
                "olmo2": q_width + kv_width}.get(family, 0)
    norms = (4 if family == "gemma3_text" else 2) * d + qk_norms
    mlp = d * experts + top_k * 3 * d * moe_ff if experts else 3 * d * ff
    n = layers * (attention + mlp + norms) + d + vocab * d  # + final norm + LM head
    return 6 * n + 12 * layers * q_width * min(seq, window or seq)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "phi3", "olmo2", "qwen3_moe"])
def test_any_family_s_flops_per_token_is_the_hand_count(family):
    """From the checkpoint's own transformers config (on the meta device): MoE counts the active experts only."""
    import transformers

    from effitrain.base.flops import model_flops_per_token
    from effitrain.model.build import _parameters_on_meta

    d, layers, heads, kv_heads, head_dim, ff, vocab, seq = 48, 3, 6, 2, 12, 88, 211, 29
    window, experts, top_k, moe_ff = 7, 5, 2, 20
    extra = {"gemma3_text": {"sliding_window": window, "layer_types": ["sliding_attention"] * layers},
             "qwen3_moe": {"num_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": moe_ff,
                           "mlp_only_layers": [], "decoder_sparse_step": 1}}.get(family, {})
    name = {"qwen3": "Qwen3Config", "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config", "olmo2": "Olmo2Config",
            "qwen3_moe": "Qwen3MoeConfig"}[family]
    config = getattr(transformers, name)(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=ff,
                                         vocab_size=vocab, tie_word_embeddings=False, pad_token_id=0, **extra)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config)
    expected = family_flops_per_token(family, d=d, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                      ff=ff, vocab=vocab, seq=seq, window=window if family == "gemma3_text" else None,
                                      experts=experts if family == "qwen3_moe" else 0, top_k=top_k, moe_ff=moe_ff)
    assert model_flops_per_token(model, seq_len=seq) == pytest.approx(expected, rel=1e-12)


# The in-process tiny run (conftest.tiny_overrides): llama, d=32, 2 layers, 2 heads, MLP 64, tied, T=32.
TINY = {"d": 32, "layers": 2, "heads": 2, "kv_heads": 2, "ff": 64, "seq": 32}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus, cache_dir):
    """8 steps of 2 x 4 sequences (grad accumulation), validation at 4 and 8, TensorBoard on."""
    from effitrain.engine.train import run

    run_dir = tmp_path_factory.mktemp("arith_run")
    run(compose(tiny_overrides(corpus, cache_dir, "grad_accum_steps=2", "max_steps=8", "eval_every=4",
                               "logging.tensorboard=true")), run_dir)
    return run_dir


def assert_rates_follow_from_flops(records: list[dict], env: dict, *, flops_per_token: int) -> None:
    """tflops_per_device = FLOPs/token x tokens/s / world size / 1e12 and mfu_pct = that / peak x 100, per record."""
    world, peak = env["world_size"], env["peak_flops"]
    assert peak > 0 and records
    for r in records:
        tflops = flops_per_token * r["tokens_per_s"] / world / 1e12
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / world, rel=1e-12)
        assert r["tflops_per_device"] == pytest.approx(tflops, rel=1e-12), r["step"]
        assert r["mfu_pct"] == pytest.approx(tflops * 1e12 / peak * 100, rel=1e-12), r["step"]


def test_tflops_and_mfu_follow_from_the_hand_count(tiny_run):
    env = json.loads((tiny_run / "env.json").read_text())
    vocab = env["vocab_size"]  # the BPE trained on the corpus: at most data.vocab_size=512
    assert 256 < vocab <= 512 and env["world_size"] == 1
    d, layers, ff = TINY["d"], TINY["layers"], TINY["ff"]
    # parameters: embedding (tied with the LM head) + per block q, k, v, o, gate, up, down, 2 norms + final norm
    assert env["num_params"] == vocab * d + layers * (4 * d * d + 3 * d * ff + 2 * d) + d
    records = read_metrics(tiny_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert_rates_follow_from_flops(records, env, flops_per_token=llama_flops_per_token(**TINY, vocab=vocab))


def test_tensorboard_events_equal_metrics_jsonl(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every event, no sampling
    acc.Reload()
    records = read_metrics(tiny_run)
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(key, []).append((r["step"], float(np.float32(value))))  # TB stores float32
    assert {"loss", "lr", "grad_norm", "tflops_per_device", "mfu_pct", "val_loss", "val_ppl"} <= set(expected)
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for key, points in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(key)] == points, key
