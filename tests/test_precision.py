"""Precision group: every option composes and trains on CPU (fp8 errors there), loss scaling skips overflows."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import compose, read_metrics, run_cli
from effitrain.base.flops import PEAK_CACHE_ENV
from effitrain.checks import check_all
from effitrain.compose import group_options
from effitrain.engine.loop import train_step
from effitrain.engine.train import Trainer, run
from effitrain.errors import UsageError
from effitrain.precision.build import PrecisionError, build_precision
from effitrain.precision.emulation import SLOWDOWN_WARNING, cpu_slowdown, warn_if_emulated

CPU_OPTIONS = ["fp32", "tf32", "fp16", "bf16"]
HAS_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_torchao = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchao") is None, reason="torchao not installed (pip install '.[ao]')")


def test_every_option_is_covered_here():
    assert set(group_options("precision")) == {*CPU_OPTIONS, "bf16-pure", "fp8"}


@pytest.mark.parametrize("option", CPU_OPTIONS)
def test_option_trains_five_steps(option, tiny, tmp_path):
    cfg = compose(tiny(f"precision={option}", "max_steps=5"))
    check_all(cfg)
    summary = run(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 5 and math.isfinite(summary["final_val_loss"])
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert ("loss_scale" in metrics[0]) == (option == "fp16")
    # the run says so when its autocast dtype is emulated on this CPU (slowdown measured once per host, cached)
    warned = re.findall(r"(fp16|bf16) on this CPU runs ~(\d+)x slower than fp32", (tmp_path / "train.log").read_text())
    if option in ("fp16", "bf16"):
        slowdown, source = cpu_slowdown(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[option]))
        assert source == "cached"  # the run's probe
        assert warned == ([(option, f"{slowdown:.0f}")] if slowdown >= SLOWDOWN_WARNING else [])
    else:
        assert warned == []


def test_emulation_probe_runs_once_per_host_then_reads_the_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(PEAK_CACHE_ENV, str(tmp_path / "peak.json"))
    slowdown, source = cpu_slowdown(torch.float16)
    assert source == "measured" and slowdown > 0
    assert cpu_slowdown(torch.float16) == (slowdown, "cached")
    entries = json.loads((tmp_path / "peak.json").read_text())["entries"].values()
    assert [e["slowdown"] for e in entries if "slowdown" in e] == [slowdown]
    # fp32 and GPUs are not probed; fp16 on this CPU warns in one line exactly when the slowdown is material
    cpu = torch.device("cpu")
    assert warn_if_emulated(build_precision(compose(["precision=fp32"]).precision, device=cpu)) is None
    caplog.clear()
    assert warn_if_emulated(build_precision(compose(["precision=fp16"]).precision, device=cpu)) == slowdown
    lines = [r.getMessage() for r in caplog.records if "slower than fp32" in r.getMessage()]
    assert len(lines) == (slowdown >= SLOWDOWN_WARNING) and all(line.startswith("fp16 on this CPU") for line in lines)


@needs_torchao
def test_bf16_pure_moves_weights_by_sub_ulp_updates(tiny, tmp_path):
    from torchao.optim import _AdamW

    cfg = compose(tiny("precision=bf16-pure", "max_steps=3", "eval_every=3"))
    check_all(cfg)
    trainer = Trainer(cfg, tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in trainer.state.model.parameters())
    assert isinstance(trainer.state.optimizer, _AdamW) and trainer.state.optimizer.bf16_stochastic_round
    trainer.close(trainer.train())
    # norm weights start at 1.0, where a bf16 ulp (2^-8 below, 2^-7 above) dwarfs the warmup updates (~lr = 3e-4..6e-4):
    # round-to-nearest would leave every one at 1.0 (see the control below); stochastic rounding moves some
    norms = torch.cat([p.detach().flatten() for n, p in trainer.state.model.named_parameters() if "norm" in n])
    assert (norms != 1).sum() > 0
    control = torch.ones(norms.numel(), dtype=torch.bfloat16, requires_grad=True)
    nearest = torch.optim.AdamW([control], lr=6e-4, weight_decay=0.0)
    control.grad = torch.randn_like(control)
    nearest.step()
    assert (control != 1).sum() == 0
    assert math.isfinite(read_metrics(tmp_path)[-1]["val_loss"])


class _LM(torch.nn.Module):
    """A two-layer LM with the `.logits` output the loop reads."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.net(input_ids)})


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    torch.manual_seed(0)
    model = _LM()
    precision = build_precision(compose(["precision=fp16"]).precision, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 16, (2, 9))
    train_step(model, optimizer, [batch], precision=precision, grad_clip=1.0)  # a clean step: the scale holds
    scale, weights = precision.loss_scale(), [p.detach().clone() for p in model.parameters()]
    assert scale == 65536.0
    hook = model.net[1].weight.register_hook(lambda g: torch.full_like(g, math.inf))  # force an overflow
    train_step(model, optimizer, [batch], precision=precision, grad_clip=1.0)
    hook.remove()
    assert precision.loss_scale() == scale / 2  # backed off: the step was skipped
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters(), strict=True))  # nothing moved
    train_step(model, optimizer, [batch], precision=precision, grad_clip=1.0)  # training goes on
    assert not all(torch.equal(a, p) for a, p in zip(weights, model.parameters(), strict=True))


def test_fp16_metrics_count_skipped_steps(tiny, tmp_path):
    # an initial scale of 2^126 (near fp32's max) overflows the scaled loss: the scaler halves it until steps fit
    cfg = compose(tiny("precision=fp16", f"precision.init_scale={2.0**126!r}", "max_steps=5", "eval_every=5"))
    run(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    assert metrics[0]["skipped_steps"] == 1 and metrics[0]["loss_scale"] == 2.0**125
    for a, b in zip(metrics, metrics[1:], strict=False):
        skipped = b["skipped_steps"] - a["skipped_steps"]
        assert b["loss_scale"] == a["loss_scale"] * (0.5 if skipped else 1.0)


def test_fp8_is_refused_on_cpu_before_start(tiny):
    with pytest.raises(UsageError, match="fp8 needs a CUDA GPU"):
        check_all(compose(tiny("precision=fp8", "device=cpu")))
    with pytest.raises(PrecisionError, match="compute capability >= 8.9"):
        build_precision(compose(["precision=fp8"]).precision, device=torch.device("cpu"))


def test_fp8_cli_error_is_one_line_exit_2(tiny, tmp_path):
    proc = run_cli("train", *tiny("precision=fp8"), cwd=tmp_path)
    if HAS_FP8:
        pytest.skip("this machine has fp8: the error path needs a device without it")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "fp8" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/*/*"))  # no run directory left behind


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.skipif(not HAS_FP8, reason="fp8 training needs a CUDA GPU with compute capability >= 8.9")
def test_fp8_trains_on_cuda(recipe, tiny, tmp_path):
    # linears of 256+ features are converted; the tiny model's are smaller, so lower the filter
    cfg = compose(tiny("precision=fp8", f"precision.fp8_recipe={recipe}", "precision.fp8_min_features=16",
                       "model.hidden_size=64", "model.intermediate_size=128", "max_steps=5"))
    summary = run(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    assert math.isfinite(summary["final_val_loss"]) and metrics[-1]["mfu_pct"] is None


def test_fsdp_policy_matches_the_option():
    policy = lambda option: build_precision(compose([f"precision={option}"]).precision,  # noqa: E731
                                            device=torch.device("cpu")).fsdp_mixed_precision()
    assert policy("fp32") is None and policy("tf32") is None
    assert (policy("fp16").param_dtype, policy("fp16").reduce_dtype) == (torch.float16, torch.float32)
    assert (policy("bf16").param_dtype, policy("bf16").reduce_dtype) == (torch.bfloat16, torch.float32)
    assert policy("bf16-pure").param_dtype == torch.bfloat16


@pytest.mark.parametrize("bad, message", [
    (["precision=bf16", "precision.init_scale=1024"], "unknown key 'precision.init_scale'"),
    (["precision=fp32", "precision.reduce_dtype=float16"], "unknown key 'precision.reduce_dtype'"),
    (["precision=fp16", "precision.backoff_factor=2"], "loss scaling needs 0 < backoff_factor < 1"),
    (["precision=fp8", "precision.fp8_recipe=blockwise"], "fp8_recipe='blockwise'"),
    (["precision=bf16-pure", "optimizer=sgd"], "stochastic rounding"),
])
def test_impossible_settings_are_one_line_errors(bad, message, tiny):
    with pytest.raises(UsageError, match=re.escape(message)):
        check_all(compose(tiny(*bad)))


@pytest.mark.extended
@needs_torchao
def test_cpu_precisions_train_under_ddp_and_fsdp(tiny, tmp_path):
    """bf16 and bf16-pure with 2 ranks of ddp and of fsdp, through the real launcher (fp16+fsdp: test_distributed)."""
    result = run_cli("train", "-m", *tiny("max_steps=3", "eval_every=3"), "precision=bf16,bf16-pure",
                     "parallel=ddp,fsdp", "launcher.nproc_per_node=2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert len(jobs) == 4
    for job in jobs:
        records = read_metrics(job)
        assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records), job
        assert (job / "rank_1.log").exists()
