"""effitrain estimate: model states against the ZeRO paper, the memory model's structure, one real measured step,
the fit check's decision, --max-batch, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import cli_in_process, compose, run_cli

GB = 1e9
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=256",
         "data.vocab_size=2048", "device=cpu"]


def _estimate(*overrides: str, shape=None):
    from effitrain.estimate import estimate

    return estimate(compose(list(overrides)), shape=shape, timing=False)


def test_zero_paper_model_states_per_gpu():
    """Rajbhandari et al. 2020, figure 1: a 7.5B model at data-parallel degree 64 with Adam (K = 12) takes 120 GB
    per GPU unpartitioned, 31.4 GB with P_os, 16.6 GB with P_os+g and 1.88 GB with P_os+g+p."""
    from effitrain.estimate import model_state_bytes

    published = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.88}
    for stage, gb in published.items():
        got = sum(model_state_bytes(7.5e9, stage=stage, dp=64).values()) / GB
        assert abs(got - gb) < 0.05, (stage, got, gb)


def test_estimate_shards_a_7b_model_like_zero():
    """A real 7B-class config through `estimate` (shapes on the meta device): FSDP over 64 ranks keeps 16 bytes per
    parameter / 64 (fp32 weights, fp32 grads, two fp32 Adam moments: ZeRO stage 3's 1.9 GB at 7.5B), ZeRO-1 over
    64 DDP ranks keeps the full weights and gradients and 1/64 of the moments (whole tensors per rank)."""
    big = ["model=llama-1b", "model.hidden_size=4096", "model.num_layers=32", "model.num_heads=32",
           "model.num_kv_heads=null", "model.intermediate_size=11008", "data.vocab_size=32000",
           "launcher.nproc_per_node=8", "launcher.nnodes=8", "batch_size=1", "device=cpu"]
    fsdp = _estimate(*big, "parallel=fsdp", "precision=bf16")
    n = fsdp.num_params
    assert 6.5e9 < n < 7.5e9
    states = fsdp.memory["parameters"] + fsdp.memory["gradients"] + fsdp.memory["optimizer_state"]
    assert abs(states - 16 * n / 64) / (16 * n / 64) < 0.01  # FSDP pads each tensor's dim 0 to a multiple of 64
    assert abs(states / GB - 1.88 * n / 7.5e9) < 0.05
    zero1 = _estimate(*big, "parallel=ddp", "optimizer=zero1")
    assert zero1.memory["parameters"] == 4 * n
    ideal, embedding = 8 * n / 64, 8 * 32000 * 4096
    # whole tensors per rank, largest first: the 131M-parameter embedding alone exceeds an even 1/64 share
    assert zero1.memory["optimizer_state"] == embedding > ideal


def test_memory_model_structure():
    from effitrain.optimizer.build import zero1_rank_loads

    base = _estimate(*SMALL, "batch_size=4")
    double = _estimate(*SMALL, "batch_size=8")
    assert double.memory["activations"] == 2 * base.memory["activations"]
    assert double.memory["logits_and_loss"] == 2 * base.memory["logits_and_loss"]
    assert double.memory["parameters"] == base.memory["parameters"]
    full = _estimate(*SMALL, "batch_size=4", "parallel.activation_checkpointing=full")
    assert full.memory["activations"] < base.memory["activations"]
    assert full.memory["activation_recompute"] == base.activations_per_layer
    fsdp = _estimate(*SMALL, "batch_size=4", "parallel=fsdp", "launcher.nproc_per_node=2")
    assert fsdp.memory["parameters"] <= base.memory["parameters"] / 2 + 4 * 64 * 16  # dim-0 padding at most
    assert fsdp.memory["fsdp_gathered_params"] > 0
    assert _estimate(*SMALL, "optimizer=sgd").memory["optimizer_state"] == base.memory["optimizer_state"] / 2
    assert _estimate(*SMALL, "optimizer=adafactor").memory["optimizer_state"] < base.memory["optimizer_state"] / 10
    assert zero1_rank_loads([10, 7, 5, 3, 1], 2) == [13, 13]
    bf16 = _estimate(*SMALL, "batch_size=4", "precision=bf16")
    assert bf16.memory["parameters"] == base.memory["parameters"]  # autocast keeps fp32 weights
    pure = _estimate(*SMALL, "batch_size=4", "precision=bf16-pure")
    assert pure.memory["parameters"] == base.memory["parameters"] / 2
    assert base.flops_per_step == base.flops_per_token * 4 * 128


def test_fsdp_block_buffers_and_the_start_of_backward():
    """A block's backward under FSDP holds its unsharded gradients and the previous block's reduce-scatter input;
    DDP and one process have none of it. Backward starts at the loss, where nothing is gathered unless the blocks
    stay gathered after forward (reshard_after_forward false)."""
    from effitrain.estimate import model_shape

    two = ["batch_size=4", "launcher.nproc_per_node=2"]
    single = _estimate(*SMALL, "batch_size=4")
    ddp = _estimate(*SMALL, *two, "parallel=ddp")
    fsdp = _estimate(*SMALL, *two, "parallel=fsdp")
    bf16 = _estimate(*SMALL, *two, "parallel=fsdp", "precision=bf16")
    kept = _estimate(*SMALL, *two, "parallel=fsdp", "parallel.reshard_after_forward=false")
    assert "fsdp_block_reduce" not in set(single.memory) | set(ddp.memory)
    shape = model_shape(compose(SMALL).model, vocab=2048, seq_len=128)
    block = shape.trained_params_per_block()
    assert fsdp.memory["fsdp_block_reduce"] == block * (4 + 4)
    assert bf16.memory["fsdp_block_reduce"] == block * (2 + 4)  # bf16 gradients, reduced in fp32
    start = kept.moments["backward start"] - fsdp.moments["backward start"]
    assert start == kept.memory["fsdp_gathered_params"]  # the only difference at that moment


def test_estimate_matches_a_measured_step():
    """The estimated peak of a real step, measured at the allocator (profiler memory events), within 10% (one
    process: the 2-rank layouts are the benchmark's grid, BENCHMARKS.md)."""
    from effitrain.engine import memprobe

    overrides = [*SMALL, "batch_size=4", "data.seq_len=64"]
    estimated = _estimate(*overrides).peak_bytes
    (measured,) = memprobe.measure([overrides], nproc=1)
    assert abs(estimated - measured) / measured < 0.10, (estimated, measured)


def test_the_measure_books_frees_made_on_other_threads():
    """gloo's worker threads free the tensors of finished collectives; the profiler's running total must drop by
    them too, or a multi-rank measure drifts up step by step (it did: 11.4 -> 33.3 MiB over 12 FSDP steps)."""
    import threading

    import torch
    from torch.profiler import ProfilerActivity, profile

    from effitrain.engine import memprobe

    flag = memprobe.cpu_memory_report_flag()
    before = flag.value
    memprobe.book_every_threads_frees()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            held = [torch.ones(1 << 20)]  # 4 MiB made here ...
            freeing = threading.Thread(target=held.clear)  # ... freed on another thread
            freeing.start()
            freeing.join()
            torch.ones(16)
    finally:
        flag.value = before
    totals = [e.extra_fields.total_allocated for e in memprobe.profiled_events(prof)
              if e.tag == torch._C._profiler._EventType.Allocation]
    assert totals[0] >= 4 << 20 and totals[-1] < 1 << 20, totals


def test_fit_verdict_and_max_batch():
    from effitrain.estimate import fit_check, fit_verdict, max_batch, model_shape

    cfg = compose([*SMALL, "batch_size=8"])
    shape = model_shape(cfg.model, vocab=2048, seq_len=cfg.data.seq_len)
    est = _estimate(*SMALL, "batch_size=8", shape=shape)
    assert fit_verdict(est, free_bytes=est.peak_bytes) is None
    line = fit_verdict(est, free_bytes=est.peak_bytes // 2)
    assert line is not None and est.biggest in line and "\n" not in line
    assert "batch_size" in line or "fsdp" in line  # names a fix
    assert max_batch(cfg, free_bytes=est.peak_bytes, shape=shape) == 8
    assert max_batch(cfg, free_bytes=_estimate(*SMALL, "batch_size=9", shape=shape).peak_bytes - 1, shape=shape) == 8
    assert max_batch(cfg, free_bytes=1, shape=shape) == 0
    assert cfg.batch_size == 8  # restored
    fit_check(cfg)  # device=cpu: no check, no error


def test_cli_estimate_json_and_errors(tmp_path, capsys):
    result = run_cli("estimate", *SMALL, "--json", "--mfu", "0.5", "--gpu", "h100", "--max-batch", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["mfu"] == 0.5 and out["peak_flops_source"] == "table (H100)"
    assert math.isclose(out["step_time_s"], out["flops_per_step"] / (0.5 * 67e12), rel_tol=1e-9)
    assert out["max_batch"] > 16
    assert not list(Path(tmp_path).iterdir())  # nothing written
    for bad in (["--mfu", "2"], ["--gpu", "tpu9"], ["model.nope=1"], ["--frobnicate"]):
        code, stderr = cli_in_process(capsys, "estimate", *SMALL, *bad)  # an exception would fail the test here
        assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("effitrain: error:"), (bad, stderr)


def test_compression_changes_what_is_stored_and_trained(tmp_path):
    """freeze, share-layers and LoRA: the estimate stores and trains the parameters the real converted model has
    (what a run logs as `trainable parameters: N of M`); frozen ones get no gradient or optimizer state. Pruning adds
    a mask byte per pruned element, a teacher its parameters, PowerSGD an fp32 copy of the gradients."""
    from tokenizers import Tokenizer, models

    from effitrain.base.converters import ConverterChain
    from effitrain.compression.build import Context, build_compression
    from effitrain.model.build import build_model

    hf = tmp_path / "hf"
    cfg = compose(SMALL)
    build_model(cfg.model, vocab_size=2048, max_seq_len=cfg.data.seq_len).save_pretrained(hf)
    Tokenizer(models.BPE()).save(str(hf / "tokenizer.json"))
    base = _estimate(*SMALL)
    n = base.num_params
    for extra in (["compression=[freeze]"], ["compression=[share-layers]"],
                  ["compression=[lora]", f"model.pretrained={hf}"]):
        cfg = compose([*SMALL, *extra])
        model = build_model(cfg.model, vocab_size=2048, max_seq_len=cfg.data.seq_len)
        model = ConverterChain(build_compression(cfg.compression, context=Context(seed=0))).convert(model)
        stored = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        est = _estimate(*SMALL, *extra)
        assert est.memory["parameters"] == 4 * stored and est.memory["gradients"] == 4 * trained, extra
        assert est.memory["optimizer_state"] == 8 * trained, extra  # AdamW: two fp32 moments per trained element
        assert trained < n
    pruned = _estimate(*SMALL, "compression=[prune-magnitude]", "max_steps=100")
    block_linears = sum(p.numel() for name, p in build_model(compose(SMALL).model, vocab_size=2048,
                                                             max_seq_len=64).named_parameters()
                        if ".layers." in name and p.dim() == 2)
    assert pruned.memory["pruning_masks"] == block_linears
    teacher = _estimate(*SMALL, "compression=[distill]", f"compression.distill.teacher={hf}")
    assert teacher.memory["teacher_parameters"] == 4 * n and teacher.peak_bytes > base.peak_bytes
    powersgd = _estimate(*SMALL, "compression=[grad-powersgd]", "parallel=ddp", "launcher.nproc_per_node=2")
    assert powersgd.memory["powersgd_error_feedback"] == 4 * n


PP_MODEL = ["model.hidden_size=64", "model.num_layers=4", "model.num_heads=2", "model.intermediate_size=256",
            "model.tie_embeddings=false", "data.vocab_size=2048", "device=cpu", "batch_size=4", "data.seq_len=64"]


def _pipeline_ranks(*overrides: str) -> list[dict]:
    """Every pipeline rank's memory items and moments (the cost model the estimate reports the worst of)."""
    from effitrain.estimate import pipeline_ranks

    return pipeline_ranks(compose([*PP_MODEL, *overrides]))


def test_pipeline_estimate_holds_each_stage_on_its_rank(capsys):
    """pp(2): rank 0 keeps the embedding and blocks 0-1, rank 1 blocks 2-3, the final norm and the head; together
    every parameter once. The estimate reports the worst rank, `effitrain estimate` too (no refusal any more)."""
    from effitrain.estimate import model_shape
    from effitrain.parallel.pipeline_cost import holds, rank_stages

    pp = ["parallel=pp", "launcher.nproc_per_node=2", "parallel.schedule=1f1b", "parallel.microbatches=2"]
    shape = model_shape(compose(PP_MODEL).model, vocab=2048, seq_len=64)
    first, last = (rank_stages(r, pp=2, per_rank=1, schedule="1f1b", num_layers=4) for r in (0, 1))
    assert [st.layers for st in first + last] == [range(0, 2), range(2, 4)]
    kinds = [{p.kind for p in shape.params if holds(p, stages) and "layers." not in p.name} for stages in (first, last)]
    assert kinds == [{"embedding"}, {"norm", "head"}]
    ranks = _pipeline_ranks(*pp)
    assert sum(r["memory"]["parameters"] for r in ranks) == 4 * shape.num_params
    assert ranks[0]["memory"]["stage_outputs"] == 0 < ranks[1]["memory"]["stage_outputs"] == 4 * 4 * 64 * 2048
    est = _estimate(*PP_MODEL, *pp)
    assert est.peak_bytes == max(max(r["moments"].values()) for r in ranks)
    assert est.config["degrees"]["pp"] == 2 and "pipeline rank" in est.notes[0]
    from effitrain.cli import main

    capsys.readouterr()
    assert main(["estimate", *PP_MODEL, *pp, "--json", "--mfu", "0.1", "--gpu", "h100"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] == est.peak_bytes


def test_microbatches_in_flight_follow_torchs_schedules():
    """The schedule's own action list (torch builds it): gpipe keeps all m microbatches in flight on every rank,
    1f1b at most p - rank; V-shaped zbv puts stages 0 and 3 on rank 0, which then holds embedding and head."""
    from effitrain.parallel.pipeline_cost import rank_stages, schedule_actions

    def most_in_flight(actions: list[tuple]) -> int:
        now = peak = 0
        for kind, _ in actions:
            now += {"F": 1, "B": -1, "W": -1}.get(kind, 0)
            peak = max(peak, now)
        return peak

    for p, m in ((2, 4), (4, 8)):
        gpipe = schedule_actions("gpipe", pp=p, per_rank=1, microbatches=m)
        one_f_one_b = schedule_actions("1f1b", pp=p, per_rank=1, microbatches=m)
        assert [most_in_flight(gpipe[r]) for r in range(p)] == [m] * p
        assert [most_in_flight(one_f_one_b[r]) for r in range(p)] == [p - r for r in range(p)]
    gp, fb = (_pipeline_ranks("parallel=pp", "launcher.nproc_per_node=2", f"parallel.schedule={s}",
                              "parallel.microbatches=4") for s in ("gpipe", "1f1b"))
    assert gp[0]["memory"]["activations"] == 2 * fb[0]["memory"]["activations"]  # 4 microbatches in flight vs 2
    assert all(g["moments"]["forward/backward"] > f["moments"]["forward/backward"] for g, f in zip(gp, fb, strict=True))
    v = rank_stages(0, pp=2, per_rank=2, schedule="zbv", num_layers=4)
    assert [(st.index, st.first, st.last) for st in v] == [(0, True, False), (3, False, True)]
    zbv = _pipeline_ranks("parallel=pp", "launcher.nproc_per_node=2", "parallel.schedule=zbv",
                          "parallel.stages_per_rank=2", "parallel.microbatches=4")
    assert zbv[0]["memory"]["stage_outputs"] > 0 and zbv[1]["memory"]["stage_outputs"] == 0


def test_pp_fsdp_shards_each_stage_over_its_data_parallel_ranks():
    """pp(2) x fsdp(2) on 4 ranks: each rank stores half of its stage's parameters and optimizer state (dim 0,
    padded), but the schedule keeps the whole stage gathered after a backward, its gradients unsharded."""
    pp = _pipeline_ranks("parallel=pp", "launcher.nproc_per_node=2", "parallel.microbatches=2")
    fsdp = _pipeline_ranks("parallel=pp-fsdp", "launcher.nproc_per_node=4", "parallel.microbatches=2")
    for whole, half in zip(pp, fsdp, strict=True):
        assert whole["memory"]["parameters"] / 2 <= half["memory"]["parameters"] < whole["memory"]["parameters"] / 1.9
        assert half["memory"]["optimizer_state"] == 2 * half["memory"]["parameters"]
        # the schedule keeps the stage gathered after a backward (resharding after backward off): whole, unpadded
        assert half["memory"]["fsdp_gathered_params"] == whole["memory"]["parameters"]
        assert half["memory"]["gradients"] == half["memory"]["parameters"]  # sharded by the step


def test_a_stage_reduces_its_gradients_while_the_ranks_other_stage_still_holds_its_own():
    """pp-fsdp with two stages on a rank: stage 1's last backward reduce-scatters a flat copy of its unsharded
    gradients while stage 0 still holds its activations; afterwards only stage 1's gradient shards remain."""
    from effitrain.parallel.pipeline_cost import Gathers, StageBytes, walk

    stages = {s: StageBytes(saved=100, backward=0, tail=0, logits=0, hidden=0) for s in (0, 1)}
    grads, whole, shards = {0: 40, 1: 40}, {0: 40, 1: 40}, {0: 20, 1: 20}
    actions = [("F", 0), ("F", 1), ("B", 1), ("B", 0)]
    unsharded = walk(actions, stages, grads=grads, gathers=Gathers(forward={0: 0, 1: 0}, whole=whole))[0]
    reduced = walk(actions, stages, grads=grads, gathers=Gathers(forward={0: 0, 1: 0}, whole=whole, reduced=shards))[0]
    # without the term the peak is both stages' activations (200); at stage 1's reduce-scatter: stage 0's activations
    # (100) + stage 1's gradients (40), its gathered parameters (40) and their flat copy (40)
    assert unsharded == 200 and reduced == 220
