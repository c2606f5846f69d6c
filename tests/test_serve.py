"""`effitrain serve-cost`: what a trained model costs to serve. The fields and their relations are checked (the KV
cache formula against the cache generate really held, weights bytes against parameters and storage dtype, totals
against per-sequence rates, the price arithmetic, the best setting and its ratio to plain generate, the Pareto
front), never the timings themselves; and bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest

from conftest import cli_in_process, only_run_dir, read_metrics, tiny_overrides, train_ok

TINY = ["--prompt", "4", "--gen", "3", "--repeats", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus, cache_dir):
    """A 4-step tiny run (validation at step 4), trained by the command in a process of its own (a run in this one
    leaves its launcher's Ctrl-C handling and log handlers behind for the later tests of this worker)."""
    cwd = tmp_path_factory.mktemp("serve")
    train_ok(cwd, *tiny_overrides(corpus, cache_dir, "max_steps=4", "eval_every=4", "eval_batches=1"))
    return only_run_dir(cwd / "outputs")


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    """name -> the run's export: fp32, bf16, PTQ int8 and PTQ int4 (as `effitrain export` writes them)."""
    from effitrain.engine.export import export_run

    root = tmp_path_factory.mktemp("exports")
    made = {"fp32": export_run(run, out=root / "fp32"), "bf16": export_run(run, out=root / "bf16", dtype="bf16")}
    for bits in ("int8", "int4"):
        made[bits] = export_run(run, out=root / bits, quantize=bits)
    return made


def serve(capsys, *args) -> list[dict]:
    """serve-cost ARGS --json in this process: its JSON lines (the command must succeed)."""
    code, out, err = _serve_out(capsys, *args, "--json")
    assert code == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _serve_out(capsys, *args) -> tuple[int, str, str]:
    from effitrain.cli import main

    capsys.readouterr()
    code = main(["serve-cost", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_exports_and_a_run_side_by_side(exports, run, tmp_path, capsys):
    from effitrain.cli import main

    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    models = [exports[k] for k in ("fp32", "bf16", "int8", "int4")] + [run]
    capsys.readouterr()
    code = main(["serve-cost", *map(str, models), *TINY, "--batch", "2", "--cache", "both", "--json",
                 "--price-per-hour", "3", "--out", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert code == 0
    # (a console handler an earlier test of this worker set up may print log lines here too)
    rows = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert rows == json.loads(out.read_text())["rows"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    by_model = {str(m): [r for r in rows if r["model"] == str(m)] for m in models}
    config = json.loads((exports["fp32"] / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for model, group in by_model.items():
        # (static, dynamic) of effitrain's, and the plain generate loop
        assert len(group) == 3 and sum(r["setting"] == "plain generate" for r in group) == 1, model
        for batch in (2,):
            same = [r for r in group if r["batch"] == batch]
            plain = next(r for r in same if r["setting"] == "plain generate")
            ours = [r for r in same if r is not plain]
            assert sum(bool(r.get("best")) for r in ours) == 1
            best = next(r for r in ours if r.get("best"))
            assert best["e2e_tokens_per_s"] == max(r["e2e_tokens_per_s"] for r in ours)
            for r in ours:
                assert r["vs_plain_generate"] == pytest.approx(r["e2e_tokens_per_s"] / plain["e2e_tokens_per_s"])
                assert r["decode_tokens_per_s_total"] == pytest.approx(batch * r["decode_tokens_per_s_per_seq"])
                assert 0 < r["token_latency_p50_s"] <= r["token_latency_p95_s"]
                assert r["latency_p95_over_p50"] == pytest.approx(r["token_latency_p95_s"] / r["token_latency_p50_s"])
                assert r["ttft_s"] > 0 and r["decode_cv"] >= 0 and r["repeats"] == 2 and r["decode_per_seq_ci95"] >= 0
                # the cache generate returned holds exactly what the formula says: prompt + gen - 1 positions
                dtype_bytes = 2 if r["dtype"] == "bf16" else 4
                formula = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * (4 + 3 - 1) \
                    * batch * dtype_bytes
                assert r["kv_cache_bytes"] == r["kv_cache_bytes_measured"] == formula, (model, r["setting"])
                assert r["rss_peak_bytes"] > 0
            for r in same:  # $ per million generated tokens = price per hour / tokens per hour
                assert r["usd_per_million_tokens"] == pytest.approx(3 / (r["e2e_tokens_per_s"] * 3600) * 1e6)
    first = {m: g[0] for m, g in by_model.items()}
    fp32, bf16, int8, int4 = (first[str(exports[k])] for k in ("fp32", "bf16", "int8", "int4"))
    params = fp32["params"]
    assert all(r["params"] == params for r in first.values())
    assert fp32["weights_bytes"] == 4 * params and bf16["weights_bytes"] == 2 * params
    assert (fp32["dtype"], bf16["dtype"]) == ("fp32", "bf16")  # each as stored
    assert int8["weights_bytes"] < fp32["weights_bytes"] and int4["weights_bytes"] < fp32["weights_bytes"]
    assert (int8["quantized"], int4["quantized"]) == ("ptq-int8", "ptq-int4")
    assert bf16["disk_bytes"] < fp32["disk_bytes"] and int8["disk_bytes"] < fp32["disk_bytes"]
    assert first[str(run)]["disk_bytes"] is None  # a checkpoint is no serving format: export it to size it
    # quality: the run's validation loss at the exported step; none for a model quantized after training
    val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]
    assert fp32["quality"] == bf16["quality"] == first[str(run)]["quality"] == val
    assert int8["quality"] is None and int4["quality"] is None
    summary = {m["model"]: m for m in json.loads(out.read_text())["models"]}
    for m in summary.values():  # on the front exactly when no other model is as good on both and better on one
        dominated = any(o["quality"] is not None and o["quality"] <= m["quality"] and o["decode_tokens_per_s_total"]
                        >= m["decode_tokens_per_s_total"] and o is not m and (o["quality"], o[
                            "decode_tokens_per_s_total"]) != (m["quality"], m["decode_tokens_per_s_total"])
                        for o in summary.values()) if m["quality"] is not None else True
        assert m["pareto"] == (not dominated), m
        assert m["decode_tokens_per_s_total"] == max(r["decode_tokens_per_s_total"] for r in by_model[m["model"]]
                                                     if r["setting"] != "plain generate")
        assert m["serve_mfu"] == pytest.approx(2 * m["params"] * m["decode_tokens_per_s_total"] / m["peak_flops"])
    # the planner prices inference tokens by the first model's measured serving MFU instead of 2N FLOPs
    capsys.readouterr()
    assert main(["plan", "--flops", "1e21", "--inference-tokens", "1e12", "--json", "--serve-cost", str(out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    serving, fp32_summary = plan["inference"]["serving"], summary[str(exports["fp32"])]
    assert serving["per_token"] == pytest.approx(2 * 0.4 / fp32_summary["serve_mfu"])
    assert serving["basis"].startswith(f"measured: {exports['fp32']} served at MFU")
    best = plan["inference"]["inference_optimal"]
    assert best["inference_flops"] == pytest.approx(serving["per_token"] * best["params"] * 1e12)


def test_quantize_and_cast_at_load(exports, capsys):
    """--quant int8 (torchao weight-only) and --dtype bf16 of an fp32 export; int4 runs only where torchao has a
    CPU kernel for it, and is otherwise refused in one line."""
    fp32 = str(exports["fp32"])
    [plain] = serve(capsys, fp32, *TINY, "--cache", "static", "--no-baseline")
    [int8] = serve(capsys, fp32, *TINY, "--cache", "static", "--no-baseline", "--quant", "int8")
    assert int8["quantized"] == "int8 weight-only (at load)" and int8["quality"] is None
    assert int8["weights_bytes"] < plain["weights_bytes"] == 4 * plain["params"]
    assert int8["kv_cache_bytes"] == plain["kv_cache_bytes"]  # weight-only: activations and cache stay fp32
    [bf16] = serve(capsys, fp32, *TINY, "--cache", "dynamic", "--no-baseline", "--dtype", "bf16")
    assert bf16["weights_bytes"] == 2 * bf16["params"] and 2 * bf16["kv_cache_bytes"] == plain["kv_cache_bytes"]
    assert bf16["kv_cache_bytes"] == bf16["kv_cache_bytes_measured"]
    code, _, err = _serve_out(capsys, fp32, *TINY, "--quant", "int4")
    if _int4_kernel():
        assert code == 0, err
    else:
        assert code == 2 and err.count("\n") == 1, err
        assert "--quant int4: torchao's Int4WeightOnlyConfig has no kernel" in err


def _int4_kernel() -> bool:
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    try:
        linear = torch.nn.Sequential(torch.nn.Linear(128, 128))
        quantize_(linear, Int4WeightOnlyConfig())
        linear(torch.ones(1, 128))
        return True
    except Exception:
        return False


def test_the_table(exports, capsys):
    code, out, err = _serve_out(capsys, str(exports["fp32"]), str(exports["int8"]), *TINY, "--cache", "static",
                                "--price-per-hour", "2")
    assert code == 0, err
    assert "| batch | prompt | gen | setting | TTFT ms |" in out and "$/M tokens" in out
    assert "static cache, compile off (best)" in out and "plain generate" in out
    assert "| model | quality | disk MB | params | weights MB | decode tok/s | best setting |" in out


def test_bad_input_is_one_line(exports, run, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (damaged / name).write_bytes((exports["fp32"] / name).read_bytes())
    (damaged / "config.json").write_text("{not json")
    fp32, int8 = str(exports["fp32"]), str(exports["int8"])
    cases = [([str(tmp_path)], "neither a Hugging Face model directory"),
             ([str(damaged)], "is damaged"),
             ([fp32, "--prompt", "30", "--gen", "4"], "exceeds"),
             ([str(run), "--prompt", "30", "--gen", "4"], "context of 32 tokens"),
             ([fp32, "--gen", "1"], "must be >= 2"),
             ([fp32, "--batch", "0"], "must be >= 1"),
             ([fp32, "--batch", "x"], "--batch takes integers"),
             ([fp32, "--repeats", "1"], "give 2 or more"),
             ([fp32, "--dtype", "fp16"], "choose one of fp32, bf16"),
             ([fp32, "--quant", "int3"], "choose one of none, int8, int4"),
             ([fp32, "--cache", "paged"], "choose one of static, dynamic, both"),
             ([fp32, "--cache", "dynamic", "--compile", "on"], "needs --cache static"),
             ([fp32, "--price-per-hour", "0"], "positive price"),
             ([fp32, "--device", "cuda"], "CPU only so far"),
             ([fp32, "--speed"], "unknown option --speed"),
             ([int8, "--quant", "int8"], "already quantized"),
             ([fp32, fp32], "given twice"),
             ([fp32, "--out", str(tmp_path / "no" / "x.json")], "its directory does not exist"),
             ([], "needs a model directory")]
    for args, message in cases:
        code, err = cli_in_process(capsys, "serve-cost", *args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)


def test_formula_and_percentiles():
    from transformers import GPT2Config, LlamaConfig

    from effitrain.commands.serve_cost import kv_cache_bytes
    from effitrain.stats import mean_interval, percentile

    llama = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2)
    assert kv_cache_bytes(llama, batch=4, tokens=10, dtype_bytes=2) == 2 * 3 * 2 * 8 * 10 * 4 * 2
    gpt2 = GPT2Config(n_embd=48, n_layer=2, n_head=4)  # every head its own K and V
    assert kv_cache_bytes(gpt2, batch=1, tokens=5, dtype_bytes=4) == 2 * 2 * 4 * 12 * 5 * 1 * 4
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([3, 1, 2], 95) == pytest.approx(2.9)
    # mean 2, sample sd 1, n 3: half-width t(2) x 1 / sqrt(3) = 4.303 / 1.732
    assert mean_interval([1.0, 2.0, 3.0]) == (2.0, pytest.approx(4.303 / 3 ** 0.5))
    assert mean_interval([5.0]) == (5.0, None)
    assert mean_interval([1.0] * 40)[1] == 0.0
