"""End to end: the real command trains, writes the run directory, and every metric is present and sane."""

from __future__ import annotations

import json
import math

import pytest

from conftest import compose, only_run_dir, read_metrics, run_cli
from effitrain.engine.train import run

STEP_KEYS = ("step", "loss", "lr", "grad_norm", "step_time_s", "data_time_s", "data_wait_pct", "tokens_per_s",
             "tokens_per_s_per_device", "samples_per_s", "tflops_per_device", "mfu_pct", "mem_active_peak_gib",
             "mem_reserved_peak_gib", "mem_pct")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus, cache_dir):
    """A tiny in-process run with grad accumulation: its run directory."""
    from conftest import tiny_overrides

    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = compose(tiny_overrides(corpus, cache_dir, "grad_accum_steps=2", "max_steps=8", "eval_every=4"))
    run(cfg, run_dir)
    return run_dir


def test_every_metric_on_every_step_is_sane(tiny_run):
    records = read_metrics(tiny_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    tokens_per_step = 4 * 2 * 32  # batch x accum x seq_len
    for r in records:
        assert set(STEP_KEYS) <= set(r), set(STEP_KEYS) - set(r)
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] >= 0
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step / r["step_time_s"])
        assert r["samples_per_s"] == pytest.approx(8 / r["step_time_s"])
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"]  # one process
        assert 0 < r["data_time_s"] < r["step_time_s"] and 0 < r["data_wait_pct"] < 100
        assert 0 < r["mfu_pct"] < 100 and r["tflops_per_device"] > 0
        assert 0 < r["mem_active_peak_gib"] <= r["mem_reserved_peak_gib"] and 0 < r["mem_pct"] < 100
        assert "loss_scale" not in r  # fp32: no loss scaling
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    last = records[-1]
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))


def test_run_directory_has_env_and_summary(tiny_run):
    env = json.loads((tiny_run / "env.json").read_text())
    for key in ("torch", "python", "device", "world_size", "data_fingerprint", "peak_flops", "peak_flops_source",
                "git_commit", "git_dirty"):
        assert key in env
    # a CPU's peak is measured; a known GPU's comes from the datasheet table
    source = env["peak_flops_source"]
    assert source.startswith("measured (") or (env["device_type"] == "cuda" and source == "table")
    assert env["peak_flops"] > 1e9 and len(env["data_fingerprint"]) == 64
    summary = json.loads((tiny_run / "summary.json").read_text())
    records = read_metrics(tiny_run)
    assert summary["final_loss"] == records[-1]["loss"] and summary["final_val_loss"] == records[-1]["val_loss"]
    assert summary["median_tokens_per_s"] > 0 and summary["mem_reserved_peak_gib"] > 0
    assert summary["startup_s"] > 0 and summary["wall_time_s"] > 0
    assert summary["first_step_time_s"] == records[0]["step_time_s"] and summary["warmup_steps"] == 3
    assert summary["warmup_time_s"] == pytest.approx(sum(r["step_time_s"] for r in records[:3]))
    steady = sorted(r["tokens_per_s"] for r in records[3:])
    assert summary["median_tokens_per_s"] == pytest.approx(steady[2])  # median of steps 4-8: warm-up left out
    # measured, not assumed; its size is a benchmark's business (scripts/bench_metrics.py), not a test's
    assert summary["metrics_overhead_pct"] > 0
    assert (tiny_run / "train.log").read_text().count("step 8/8") == 1


def test_default_corpus_through_the_real_command(tmp_path, cache_dir):
    """`effitrain train` on the embedded stdlib corpus (tiny model, few steps): loss falls, run dir complete."""
    out = run_cli("train", f"data.cache_dir={cache_dir}", "model.num_layers=2", "batch_size=8", "data.seq_len=64",
                  "max_steps=16", "eval_every=8", "optimizer.lr=1e-2", "schedule.warmup_steps=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "outputs")
    assert {".hydra", "env.json", "metrics.jsonl", "summary.json", "train.log"} <= {p.name for p in run_dir.iterdir()}
    records = read_metrics(run_dir)
    assert len(records) == 16
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0] < records[0]["loss"]
    assert "parameters" in out.stdout and "tokens per optimizer step" in out.stdout
    assert "step 16/16" in out.stdout


def test_tensorboard_sink_writes_events(tmp_path, corpus, cache_dir):
    from conftest import tiny_overrides

    run(compose(tiny_overrides(corpus, cache_dir, "max_steps=2", "logging.tensorboard=true")), tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _train_until(cfg, run_dir, *, until: int, state: dict | None = None) -> dict:
    """A Trainer built as `run` builds it, loaded with `state` if given, trained to step `until`: its state dict."""
    import torch

    from effitrain.engine.runtime import job_runtime
    from effitrain.engine.train import Trainer

    run_dir.mkdir()
    with job_runtime(seed=cfg.seed, deterministic=False, tf32=False, device=torch.device("cpu"), keep_freed=True):
        trainer = Trainer(cfg, run_dir)
        if state is not None:
            trainer.state.load_state_dict(state)
        extra = trainer.train(until=until)
        saved = trainer.state.state_dict()  # this trainer steps no more: its tensors can be handed on as they are
        trainer.close(extra)
    return saved


@pytest.mark.parametrize("extra", [[], ["precision=fp16", f"precision.init_scale={2.0**126!r}"], ["optimizer=muon"]],
                         ids=["fp32", "fp16-overflowing", "muon"])
def test_a_loaded_train_state_continues_bit_for_bit(tiny, tmp_path, extra):
    """Train 3 of 6 steps, hand the TrainState to a fresh Trainer, train 4-6: the same losses, lrs and grad norms
    as 6 steps in one go (model, AdamW moments, schedule, loss scaler, step, RNG all carried; data position = the
    step). Metrics flush every 4 steps, so the first part also ends between flushes; fp16 starts at a scale that
    overflows, so skipped steps and the backed-off scale must carry over too; muon's two optimizers share one state."""
    cfg = compose(tiny("max_steps=6", "eval_every=6", "schedule.warmup_steps=2", "logging.every=4", *extra))
    run(cfg, tmp_path / "whole")
    half = _train_until(cfg, tmp_path / "first", until=3)
    assert (half["trainer"]["step"], half["trainer"]["tokens_seen"]) == (3, 3 * 4 * 32)
    _train_until(cfg, tmp_path / "second", until=6, state=half)
    keys = ("step", "loss", "lr", "grad_norm", "loss_scale", "skipped_steps")
    whole = [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "whole")]
    first, second = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "second")
    assert [r["step"] for r in first] == [1, 2, 3]
    assert [{k: r.get(k) for k in keys} for r in first + second] == whole
    assert second[-1]["val_loss"] == read_metrics(tmp_path / "whole")[-1]["val_loss"]
    if "precision=fp16" in extra:
        assert whole[0]["skipped_steps"] == 1 and whole[-1]["loss_scale"] < 2.0**126


def _train_through_disk(cfg, run_dir, *, until: int, checkpoint=None):
    """A Trainer as `run` builds it, loaded from `checkpoint` (a step-N dir) if given, trained to `until`, its
    TrainState saved to run_dir/checkpoints/step-{until} through the run's Checkpointer (DCP on disk)."""
    import torch

    from effitrain.checkpoint.store import load_checkpoint
    from effitrain.engine.runtime import job_runtime
    from effitrain.engine.train import Trainer

    run_dir.mkdir()
    with job_runtime(seed=cfg.seed, deterministic=False, tf32=False, device=torch.device("cpu"), keep_freed=True):
        trainer = Trainer(cfg, run_dir)
        if checkpoint is not None:
            load_checkpoint(trainer.state, checkpoint, world=trainer.world)
        extra = trainer.train(until=until)
        trainer.checkpointer.save(trainer.state)
        trainer.close(extra)
    return run_dir / "checkpoints" / f"step-{until}"


def test_pruning_continues_its_schedule_and_masks_from_disk(tiny, tmp_path):
    """Magnitude pruning updated at steps 1 and 3 only: a run saved after step 1 and resumed keeps step 2's masks
    (read back from the loaded zeros) and updates at step 3 by the schedule -- sparsity, loss and grad norm as in
    one go."""
    cfg = compose(tiny("max_steps=3", "eval_every=3", "checkpoint.every=0", "compression=[prune-magnitude]",
                       "compression.prune_magnitude.start_step=1", "compression.prune_magnitude.end_step=3",
                       "compression.prune_magnitude.frequency=2", "compression.prune_magnitude.initial_sparsity=0.3"))
    run(cfg, tmp_path / "whole")
    first = _train_through_disk(cfg, tmp_path / "first", until=1)
    _train_through_disk(cfg, tmp_path / "second", until=3, checkpoint=first)
    keys = ("step", "loss", "grad_norm", "sparsity")
    whole = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "whole")]
    assert whole[0]["sparsity"] == pytest.approx(0.3, abs=0.01) and whole[2]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "second")] == whole[1:]


@pytest.mark.parametrize("extra", [
    ["optimizer=adamw"], ["optimizer=sgd"], ["optimizer=adafactor"], ["optimizer=adamw-8bit"], ["optimizer=muon"],
    ["optimizer=zero1", "parallel=ddp"], ["precision=bf16-pure"], ["precision=bf16-pure", "optimizer=adamw-8bit"],
    ["compression=[share-layers]"],  # two blocks, one module: DCP saves and loads the shared tensors once
    ["precision=fp16", f"precision.init_scale={2.0**126!r}"],  # step 1 overflows: the scaler's state must load
], ids=lambda o: "+".join(x.split("=")[1] for x in o))
def test_every_optimizer_continues_bit_for_bit_from_disk(extra, tiny, tmp_path):
    """Save after step 1 (DCP on disk), load into a fresh Trainer, train step 2: the same loss, grad norm and lr as 2
    steps in one go -- for every option of the optimizer group (ZeRO-1's per-rank shard, torchao's 8-bit state,
    bf16 stochastic rounding, whose random bits come from the restored RNG, included)."""
    cfg = compose(tiny("max_steps=2", "eval_every=2", "checkpoint.every=0", *extra))
    run(cfg, tmp_path / "whole")
    first = _train_through_disk(cfg, tmp_path / "first", until=1)
    _train_through_disk(cfg, tmp_path / "second", until=2, checkpoint=first)
    keys = ("step", "loss", "grad_norm", "lr", "loss_scale", "skipped_steps")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "second")] == \
        [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "whole")][1:]
