"""effitrain plan (Chinchilla's table 3, approach 3's closed form, Sardana et al.'s inference shift) and
effitrain scaling-fit (the power-law fit, reading a sweep directory, the plot)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import cli_in_process, compose, run_cli

# Hoffmann et al. 2022, table 3: compute-optimal (parameters, FLOPs, tokens)
TABLE3 = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9), (67e9, 5.76e23, 1.5e12),
          (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12), (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12),
          (10e12, 1.30e28, 216.2e12)]


@pytest.mark.parametrize("params,flops,tokens", TABLE3)
def test_chinchilla_table3_reproduced(params, flops, tokens):
    from effitrain.commands.plan import compute_optimal

    n, d = compute_optimal(flops, fit="approach1")
    assert abs(n - params) / params < 0.10, (n, params)
    assert abs(d - tokens) / tokens < 0.10, (d, tokens)


def test_approach3_closed_form_is_the_minimum():
    """The closed form minimises E + A/N^a + B/D^b on 6ND = C, and its exponents are the paper's table 2 row for
    approach 3 (N ~ C^0.46, D ~ C^0.54)."""
    from effitrain.commands.plan import compute_optimal, loss

    c = 1e22
    n, d = compute_optimal(c, fit="approach3")
    assert math.isclose(6 * n * d, c, rel_tol=1e-12)
    for factor in (0.8, 0.95, 1.05, 1.25):
        assert loss(n, d) < loss(n * factor, c / (6 * n * factor))
    n2, _ = compute_optimal(c * 10, fit="approach3")
    assert abs(math.log10(n2 / n) - 0.46) < 0.01  # beta / (alpha + beta) = 0.452 from the rounded coefficients


def test_inference_tokens_shift_to_a_smaller_model():
    from effitrain.commands.plan import compute_optimal, inference_optimal, loss

    c = 1e21
    n0, d0 = compute_optimal(c, fit="approach3")
    n, d = inference_optimal(c, 0.0)  # no inference: the compute-optimal model
    assert abs(n - n0) / n0 < 1e-3
    n, d = inference_optimal(c, 1e12)
    assert n < n0 and d > d0
    assert math.isclose(loss(n, d), loss(n0, d0), rel_tol=1e-9)  # the same loss
    total = lambda nn, dd: 6 * nn * dd + 2 * nn * 1e12  # noqa: E731
    assert total(n, d) < total(n0, d0)
    for factor in (0.9, 1.1):  # a local minimum along the loss level
        m = n * factor
        from effitrain.commands.plan import tokens_for_loss

        assert total(n, d) <= total(m, tokens_for_loss(m, loss(n0, d0)))


def test_a_measured_serving_cost_weighs_inference(tmp_path, capsys):
    """plan --serve-cost FILE: an inference token costs 2N x (training MFU / serving MFU) FLOP-equivalents; a model
    served at a tenth of training's MFU shifts the plan to a smaller model than the 2N assumption does."""
    from effitrain.commands.plan import make_plan, serving_basis

    served = {"device": "cpu", "models": [{"model": "m", "params": 1000, "decode_tokens_per_s_total": 100.0,
                                           "serve_mfu": 0.04}]}
    measured = serving_basis(served, mfu=0.4)
    assert measured["per_token"] == pytest.approx(20.0) and measured["basis"].startswith("measured: m served")
    assumed = make_plan(c=1e21, source="given", fit="approach1", vocab=4096, seq_len=512, gpus=1,
                        inference_tokens=1e12)
    shifted = make_plan(c=1e21, source="given", fit="approach1", vocab=4096, seq_len=512, gpus=1,
                        inference_tokens=1e12, serving=measured)
    a, m = assumed.inference["inference_optimal"], shifted.inference["inference_optimal"]
    assert assumed.inference["serving"]["per_token"] == 2.0 and a["inference_flops"] == 2 * a["params"] * 1e12
    assert m["params"] < a["params"] and m["inference_flops"] == pytest.approx(20 * m["params"] * 1e12)
    assert m["loss"] == pytest.approx(a["loss"])  # the same loss, reached by a smaller model trained longer
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(served))
    from effitrain.cli import main

    capsys.readouterr()
    assert main(["plan", "--flops", "1e21", "--inference-tokens", "1e12", "--serve-cost", str(path)]) == 0
    assert "inference cost measured: m served at MFU 0.04" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps({"models": [{"model": "m"}]}))
    for args, message in [(["--serve-cost", str(path)], "give --inference-tokens T with it"),
                          (["--inference-tokens", "1e12", "--serve-cost", str(tmp_path / "none.json")], "no such file"),
                          (["--inference-tokens", "1e12", "--serve-cost", str(tmp_path / "bad.json")],
                           "not a serve-cost --out file")]:
        code, err = cli_in_process(capsys, "plan", "--flops", "1e21", *args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)


def test_nearest_llama_and_command_compose():
    from effitrain.commands.plan import make_plan, nearest_llama

    choice = nearest_llama(1e9, vocab=32768)
    assert abs(choice.params - 1e9) / 1e9 < 0.05 and choice.hidden_size % choice.num_heads == 0
    p = make_plan(c=1e20, source="given", fit="approach1", vocab=4096, seq_len=512, gpus=1, inference_tokens=None)
    overrides = p.command.split()[2:]
    cfg = compose(overrides)  # a ready command: it composes as train would run it
    tokens = cfg.max_steps * cfg.batch_size * cfg.grad_accum_steps * cfg.data.seq_len
    assert abs(tokens - p.tokens) / p.tokens < 0.01


def test_cli_plan(tmp_path, capsys):
    result = run_cli("plan", "--gpus", "8", "--gpu", "h100", "--hours", "24", "--mfu", "0.4", "--json",
                     "--inference-tokens", "1e12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert math.isclose(out["budget_flops"], 8 * 989.4e12 * 24 * 3600 * 0.4)
    assert out["inference"]["inference_optimal"]["total_flops"] < out["inference"]["compute_optimal"]["total_flops"]
    for bad in ([], ["--flops", "1e20", "--gpus", "8"], ["--flops", "-1"], ["--gpus", "8", "--gpu", "tpu", "--hours",
                                                                             "1"], ["--fit", "x", "--flops", "1e20"]):
        code, stderr = cli_in_process(capsys, "plan", *bad)  # an exception would fail the test here
        assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("effitrain: error:"), (bad, stderr)


def test_power_law_fit_recovers_a_known_law():
    import numpy as np

    from effitrain.commands.scaling import fit_power_law

    n = np.geomspace(1e5, 1e8, 6)
    law = fit_power_law(n, 2.0 + 50.0 / n**0.3)
    assert abs(law.E - 2.0) < 1e-3 and abs(law.alpha - 0.3) < 1e-3 and abs(law.A - 50) / 50 < 1e-2
    noisy = 2.0 + 50.0 / n**0.3 + np.array([0.01, -0.01, 0.005, -0.004, 0.008, -0.006])
    law = fit_power_law(n, noisy)
    assert law.alpha_err is not None and law.alpha_err > 0
    value, err = law.predict(3e8)
    assert err is not None and abs(value - (2.0 + 50.0 / 3e8**0.3)) < 5 * err + 0.02
    with pytest.raises(Exception, match="at least 3"):
        fit_power_law([1, 2], [3, 4])


def _fake_job(directory, *, hidden: int, law, steps=(50, 100)):
    """A job directory as effitrain writes it (saved config, env.json, metrics.jsonl), with losses from `law`."""
    from omegaconf import OmegaConf

    from effitrain.estimate import model_shape

    overrides = ["model.num_layers=2", "model.num_heads=2", f"model.hidden_size={hidden}", "data.vocab_size=512"]
    cfg = compose(overrides)
    (directory / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, directory / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), directory / ".hydra" / "overrides.yaml")
    (directory / "env.json").write_text(json.dumps({"vocab_size": 512}))
    shape = model_shape(cfg.model, vocab=512, seq_len=cfg.data.seq_len)
    n = sum(p.numel for p in shape.params if p.kind not in ("embedding", "head", "position"))
    rows = [{"step": s, "loss": 9.0, "val_loss": law(n) + 1.0 / s} for s in steps]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return n


def test_scaling_fit_cli_on_a_sweep_directory(tmp_path):
    law = lambda n: 1.5 + 30.0 / n**0.25  # noqa: E731
    sweep = tmp_path / "sweep"
    for i, hidden in enumerate((32, 64, 96, 128)):
        _fake_job(sweep / str(i), hidden=hidden, law=law)
    held = tmp_path / "held"
    n_held = _fake_job(held, hidden=192, law=law)
    result = run_cli("scaling-fit", str(sweep), "--check", str(held), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert abs(out["law_n"]["alpha"] - 0.25) < 0.01
    assert out["check"]["params"] == n_held and abs(out["check"]["error_pct"]) < 0.5
    assert (sweep / "scaling_fit.png").stat().st_size > 1000
    assert out["law_c"] is not None  # steps vary within each job: the compute frontier has points
    result = run_cli("scaling-fit", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("effitrain: error:")
