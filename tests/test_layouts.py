"""More layouts against one process, all through the real `effitrain train` (gloo ranks on CPU, fp32, 8 steps).

Same seed, same global batch of 4 sequences; per-step loss within 1e-5 relative of the single-process run:
HSDP on a real 2 x 2 mesh (4 ranks), FSDP with cpu offload (2 ranks), selective activation checkpointing,
grouped-query attention (4 heads, 2 kv heads) alone and under tensor parallelism (2 ranks: one kv head each);
deterministic=true is bit-identical to the default on CPU. The multi-rank runs' tflops/MFU divide by the world size.
The one-process variants share one `-m` sweep (one process, 8 in-process jobs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import assert_losses_close, losses, only_run_dir, read_metrics, tiny_overrides, train_ok

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # the longest layout runs: out of the default run
RTOL = 1e-5
STEPS = 8
D, LAYERS, HEADS, KV_HEADS = 32, 2, 4, 2  # tiny_overrides' d=32, 2 layers; 4 heads of 8 so 2 kv heads split over TP(2)


@pytest.fixture(scope="module")
def base(corpus, cache_dir):
    return tiny_overrides(corpus, cache_dir, f"model.num_heads={HEADS}", f"max_steps={STEPS}", f"eval_every={STEPS}",
                          "schedule.warmup_steps=2", "optimizer.lr=1e-2")


def _env(run_dir: Path) -> dict:
    return json.loads((run_dir / "env.json").read_text())


def _assert_close(a: list[float], b: list[float], rtol: float = RTOL, what: str = "") -> None:
    assert_losses_close(a, b, steps=STEPS, rtol=rtol, what=what)


def _variant(job: Path) -> str:
    """A one-process sweep job's name from its saved config: single[+det][+sac][+gqa]."""
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    parts = ["single"]
    parts += ["det"] if cfg.deterministic else []
    parts += ["sac"] if cfg.parallel.activation_checkpointing == "selective" else []
    parts += ["gqa"] if cfg.model.num_kv_heads else []
    return "+".join(parts)


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory) -> dict[str, Path]:
    """name -> run directory of every run the tests compare."""
    out = {}
    single = tmp_path_factory.mktemp("single")  # 2 x 2 x 2 one-process jobs of batch 4
    train_ok(single, "-m", *base, "batch_size=4", "deterministic=false,true",
             "parallel.activation_checkpointing=none,selective", "parallel.ac_every=2", "model.num_kv_heads=null,2")
    for job in sorted((single / "outputs" / "multirun").glob("*/*/[0-9]*")):
        out[_variant(job)] = job
    assert len(out) == 8, sorted(out)

    for name, args in {
        "hsdp": ("batch_size=1", "launcher.nproc_per_node=4", "parallel=hsdp", "parallel.dp_replicate=2"),
        "fsdp+offload": ("batch_size=2", "launcher.nproc_per_node=2", "parallel=fsdp", "parallel.offload=cpu"),
        "tp+gqa": ("batch_size=4", "launcher.nproc_per_node=2", "parallel=tp", f"model.num_kv_heads={KV_HEADS}"),
    }.items():
        tmp = tmp_path_factory.mktemp(name.replace("+", "_"))
        train_ok(tmp, *base, *args)
        out[name] = only_run_dir(tmp / "outputs")
    for run_dir in out.values():  # every run trains the same global batch: 4 sequences per optimizer step
        assert "global batch 4 sequences" in (run_dir / "train.log").read_text(), run_dir
    return out


def test_hsdp_on_a_2x2_mesh_matches_single(runs):
    from effitrain.parallel import parallel_degrees

    cfg = OmegaConf.load(runs["hsdp"] / ".hydra" / "config.yaml")
    d = parallel_degrees(cfg.parallel, world_size=_env(runs["hsdp"])["world_size"])
    assert (d.dp_replicate, d.dp_shard, d.tp) == (2, 2, 1)  # 2 replicas of 2-way shards, not a 1-D mesh
    _assert_close(losses(runs["single"]), losses(runs["hsdp"]), what="hsdp(2x2) vs single")


def test_fsdp_cpu_offload_matches_single(runs):
    _assert_close(losses(runs["single"]), losses(runs["fsdp+offload"]), what="fsdp(2) offload=cpu vs single")


@pytest.mark.parametrize("variant", ["", "+gqa"], ids=["mha", "gqa"])
def test_selective_activation_checkpointing_matches_none(runs, variant):
    """ac_every=2 of 2 blocks: block 0 recomputes in backward, block 1 keeps its activations."""
    _assert_close(losses(runs["single" + variant]), losses(runs["single+sac" + variant]),
                  what=f"selective AC vs none{variant}")


@pytest.mark.parametrize("variant", ["", "+sac", "+gqa", "+sac+gqa"])
def test_deterministic_is_bit_identical_on_cpu(runs, variant):
    deterministic = losses(runs["single+det" + variant])
    assert len(deterministic) == STEPS and deterministic == losses(runs["single" + variant])


def test_grouped_query_attention_trains_and_tp_matches_single(runs):
    gqa = losses(runs["single+gqa"])
    assert all(math.isfinite(x) for x in gqa) and gqa[-1] < gqa[0]
    assert read_metrics(runs["single+gqa"])[-1]["val_loss"] < gqa[0]
    # k and v project to 2 heads of 8 instead of 4: each of the 2 blocks has 2 x 32 x 16 fewer weights
    head_dim = D // HEADS
    fewer = LAYERS * 2 * D * (HEADS - KV_HEADS) * head_dim
    assert _env(runs["single"])["num_params"] - _env(runs["single+gqa"])["num_params"] == fewer
    assert gqa != losses(runs["single"])
    # TP(2) shards whole heads: 2 query heads and their one kv head per rank
    _assert_close(gqa, losses(runs["tp+gqa"]), what="tp(2) gqa vs single gqa")


@pytest.mark.parametrize("name, reference, world", [("hsdp", "single", 4), ("fsdp+offload", "single", 2),
                                                    ("tp+gqa", "single+gqa", 2)])
def test_multi_rank_tflops_and_mfu_divide_by_the_world_size(runs, name, reference, world):
    """FLOPs/token from the one-process run of the same model (pinned to a hand count in test_arithmetic);
    per device = x global tokens/s / world size, also under TP, where the data-parallel size is 1."""
    [first] = read_metrics(runs[reference])[:1]
    flops_per_token = first["tflops_per_device"] * 1e12 / first["tokens_per_s"]
    env = _env(runs[name])
    assert env["world_size"] == world and env["peak_flops"] > 0
    for r in read_metrics(runs[name]):
        tflops = flops_per_token * r["tokens_per_s"] / world / 1e12
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / world, rel=1e-12)
        assert r["tflops_per_device"] == pytest.approx(tflops, rel=1e-12), r["step"]
        assert r["mfu_pct"] == pytest.approx(tflops * 1e12 / env["peak_flops"] * 100, rel=1e-12), r["step"]
