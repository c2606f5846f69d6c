"""Pipeline parallel through the real `effitrain train` (gloo ranks on CPU, fp32): pp(2) under every schedule
effitrain offers, pp(2) x fsdp(2) with one stage per rank and with two under every interleaved / V schedule,
pp(2) x fsdp(2) x tp(2) on 8 ranks (interleaved-1f1b), pp(2) x tp(2) with sequence parallel and pp(2) split by cost
give single's per-step losses and validation losses within 1e-5 relative; a pp(2) run, a pp(2) x fsdp(2) zbv run and
a pp(2) x fsdp(2) x tp(2) run stopped and resumed are bit-identical to uninterrupted ones, a pp(2) checkpoint
resumes on one rank;
its export is the model the checkpoint holds; what pipelines do not run yet is refused in one line, exit 2.
transformers' own families as model.pretrained checkpoints split at their base_model_pp_plan's boundaries (each
family's stages run in turn are the whole model: llama, qwen3, mistral), each rank reading only its stage's tensors,
and a qwen3 checkpoint trains as single does (pp(2) x fsdp(2) in the extended set).

A 4-block tiny llama (untied embeddings: the first and the last stage would share them) so that 2 ranks x 2
stages per rank get one block each; 4 sequences per step, 4 microbatches (2 under pp-fsdp's 2 data-parallel ranks).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import (
    assert_losses_close,
    cli_in_process,
    losses,
    only_run_dir,
    read_metrics,
    run_cli,
    tiny_overrides,
    train_ok,
)
from effitrain.model import PP_FAMILIES
from test_own_tokenizer import FAMILIES, own_checkpoint

RTOL = 1e-5
STEPS = 6
PP = ["parallel=pp", "launcher.nproc_per_node=2"]
ONE_STAGE_PER_RANK = ("gpipe", "1f1b")  # trained with grad_accum_steps=2: the loss scale spans the accumulation
TWO_STAGES_PER_RANK = ("interleaved-1f1b", "zero-bubble", "zbv")  # the list
EXTRA = ("looped-bfs", "dualpipev")  # the rest of torch's schedules: in the extended set (CI time)
SWEEPS = {ONE_STAGE_PER_RANK: ("grad_accum_steps=2",), TWO_STAGES_PER_RANK: ("parallel.stages_per_rank=2",),
          EXTRA: ("parallel.stages_per_rank=2",)}


@pytest.fixture(scope="module")
def base(corpus, cache_dir):
    return tiny_overrides(corpus, cache_dir, "model.num_layers=4", "model.tie_embeddings=false", f"max_steps={STEPS}",
                          "eval_every=3", "checkpoint.every=3", "checkpoint.keep_last=0")


def _jobs(cwd: Path) -> dict[tuple, Path]:
    """(schedule or "single", grad_accum_steps) -> the run directory of each job of a `-m` sweep in cwd."""
    out = {}
    for job in sorted((cwd / "outputs" / "multirun").glob("*/*/[0-9]*")):
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        out[(cfg.parallel.get("schedule", "single"), cfg.grad_accum_steps)] = job
    return out


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """runs(key) -> run directory, made on first use, one `-m` sweep at a time: ("single", grad_accum_steps) or
    (schedule, grad_accum_steps) of pp(2)."""
    made: dict[tuple, Path] = {}

    def get(key: tuple) -> Path:
        if key not in made:
            if key[0] == "single":
                args = ("grad_accum_steps=1,2",)
            else:
                schedules = next(group for group in SWEEPS if key[0] in group)
                args = (*PP, f"parallel.schedule={','.join(schedules)}", *SWEEPS[schedules])
            cwd = tmp_path_factory.mktemp(key[0])
            train_ok(cwd, "-m", *base, *args)  # a sweep: one job per schedule (or accumulation)
            made.update(_jobs(cwd))
        return made[key]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [*ONE_STAGE_PER_RANK, *TWO_STAGES_PER_RANK,
                                      *(pytest.param(s, marks=pytest.mark.extended) for s in EXTRA)])
def test_pp2_matches_single_under_every_schedule(runs, schedule):
    accum = 2 if schedule in ONE_STAGE_PER_RANK else 1
    single, pp = runs(("single", accum)), runs((schedule, accum))
    assert_losses_close(losses(single), losses(pp), steps=STEPS, rtol=RTOL, what=f"pp(2) {schedule} vs single")
    val = [[r["val_loss"] for r in read_metrics(run) if "val_loss" in r] for run in (single, pp)]
    assert_losses_close(*val, steps=2, rtol=RTOL, what=f"pp(2) {schedule} validation vs single")
    for r in read_metrics(pp):
        assert 0 <= r["bubble_pct"] < 100 and len(r["stage_mem_peak_gib"]) == 2
        assert len(r["stage_busy_ms"]) == 2 and all(b > 0 for b in r["stage_busy_ms"])
        # gpipe / 1f1b: (p - 1) / (m + p - 1) with p = 2 stages, m = 4 microbatches
        assert r.get("bubble_theory_pct") == (20.0 if schedule in ONE_STAGE_PER_RANK else None)
    env = json.loads((pp / "env.json").read_text())
    assert env["world_size"] == 2 and f"global batch {4 * accum} sequences" in (pp / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.extended
def test_pp2_x_fsdp2_matches_single(runs, base, tmp_path):
    """4 ranks: 2 stages x 2 data-parallel FSDP shards, 2 sequences per rank (the same global batch of 4), under
    gpipe (1f1b under pp-fsdp: the qwen3 checkpoint's test below)."""
    train_ok(tmp_path, *base, "parallel=pp-fsdp", "launcher.nproc_per_node=4", "parallel.pp=2", "batch_size=2",
             "parallel.microbatches=2", "parallel.schedule=gpipe")
    run = only_run_dir(tmp_path / "outputs")
    assert_losses_close(losses(runs(("single", 1))), losses(run), steps=STEPS, rtol=RTOL,
                        what="pp(2) x fsdp(2) gpipe")
    assert "global batch 4 sequences" in (run / "train.log").read_text()


@pytest.mark.slow
def test_pp2_split_by_cost_moves_a_block_off_the_heads_stage_and_matches_single(runs, base, tmp_path):
    """split=cost on the tiny llama (its head weighs ~1.6 blocks): stage 0 takes blocks 0-2, the head's stage block
    3; the losses are single's."""
    train_ok(tmp_path, *base, *PP, "parallel.split=cost")
    run = only_run_dir(tmp_path / "outputs")
    assert "pipeline: 2 stages over 2 ranks, blocks per stage 0-2 | 3" in (run / "train.log").read_text()
    assert_losses_close(losses(runs(("single", 1))), losses(run), steps=STEPS, rtol=RTOL, what="pp(2) split=cost")


FSDP_TWO_STAGES = (*TWO_STAGES_PER_RANK, *EXTRA)  # every schedule with several stages per rank


@pytest.fixture(scope="module")
def fsdp_runs(base, tmp_path_factory) -> dict[str, Path]:
    """schedule -> a pp(2) x fsdp(2) run with 2 stages per rank (4 sequences per data-parallel rank, 4 microbatches;
    weights kept gathered from forward to backward, as the split-backward schedules need); "single" -> single at the
    same global batch of 8."""
    cwd = tmp_path_factory.mktemp("pp-fsdp-two-stages")
    train_ok(cwd, "-m", *base, "parallel=pp-fsdp", "launcher.nproc_per_node=4", "batch_size=4",
             f"parallel.schedule={','.join(FSDP_TWO_STAGES)}", "parallel.stages_per_rank=2",
             "parallel.reshard_after_forward=false")
    made = {schedule: run for (schedule, _), run in _jobs(cwd).items()}
    (cwd / "single").mkdir()
    train_ok(cwd / "single", *base, "batch_size=8")
    return made | {"single": only_run_dir(cwd / "single" / "outputs")}


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("schedule", FSDP_TWO_STAGES)
def test_pp2_x_fsdp2_with_two_stages_per_rank_matches_single(fsdp_runs, schedule):
    """Each stage of a rank is an FSDP root of its own (the schedule gathers and reduces it): losses, gradient norms
    and validation equal single's."""
    for key in ("loss", "grad_norm", "val_loss"):
        values = [[r[key] for r in read_metrics(fsdp_runs[k]) if key in r] for k in ("single", schedule)]
        assert_losses_close(*values, steps=2 if key == "val_loss" else STEPS, rtol=RTOL,
                            what=f"pp(2) x fsdp(2) {schedule} {key}")


@pytest.mark.slow
@pytest.mark.extended
def test_pp2_x_fsdp2_with_two_stages_per_rank_resumes_bit_identically(fsdp_runs, tmp_path):
    """zbv (a V: rank 0 holds the first and the last stage) stopped after step 3 and resumed on its 4 ranks."""
    copy = tmp_path / "stopped"
    _copy_run(fsdp_runs["zbv"], copy, keep_step=3)
    result = run_cli("resume", str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _compared(copy) == _compared(fsdp_runs["zbv"])


@pytest.fixture(scope="module")
def pp_run(base, tmp_path_factory) -> Path:
    """An uninterrupted pp(2) 1f1b run (checkpoints at steps 3 and 6)."""
    cwd = tmp_path_factory.mktemp("pp-reference")
    train_ok(cwd, *base, *PP)
    return only_run_dir(cwd / "outputs")


COMPARED = ("step", "loss", "grad_norm", "lr", "val_loss")


def _compared(run_dir: Path) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in read_metrics(run_dir)]


def _copy_run(original: Path, copy: Path, *, keep_step: int) -> None:
    """A copy of a run directory stopped after step `keep_step`: its only checkpoint and metrics up to it."""
    import shutil

    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("step-*"))
    shutil.copytree(original / "checkpoints" / f"step-{keep_step}", copy / "checkpoints" / f"step-{keep_step}")


@pytest.mark.slow
def test_pp2_resumes_bit_identically_and_on_one_rank(pp_run, tmp_path):
    """The pp(2) run stopped after step 3 and resumed on 2 ranks is the uninterrupted run bit for bit; on 1 rank
    (one stage: DCP gathers both ranks' stages, named as in the whole model) its losses stay within 1e-5."""
    for world in (2, 1):
        copy = tmp_path / f"world{world}"
        _copy_run(pp_run, copy, keep_step=3)
        result = run_cli("resume", str(copy), f"launcher.nproc_per_node={world}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        if world == 2:
            assert _compared(copy) == _compared(pp_run)
        else:
            assert_losses_close(losses(pp_run), losses(copy), steps=STEPS, rtol=RTOL, what="pp(2) -> 1 rank")
        assert json.loads((copy / "resumes.jsonl").read_text().splitlines()[0])["from_step"] == 3


@pytest.mark.slow
@pytest.mark.extended
def test_pp2_x_fsdp2_x_tp2_matches_single_and_resumes_bit_identically(base, tmp_path):
    """8 ranks on the 3-D mesh (pp, dp_shard, tp): 2 pipeline ranks holding 2 stages each (interleaved-1f1b: each
    stage an FSDP root of its own) x 2 FSDP shards x 2 TP ranks, 2 sequences per
    data-parallel rank (the same global batch of 4), against single, both clipping every step (norms ~0.9 over
    grad_clip=0.5; on single, clipping at 0.5 instead of 1.0 moves the step-6 grad norm by 5.8e-4 relative and the
    second validation loss by 8.8e-5, so a clip wrong over the 3-D mesh fails); then the run stopped after step 3
    and resumed on 8 ranks is the uninterrupted run bit for bit."""
    clip = (*base, "grad_clip=0.5")
    (tmp_path / "single").mkdir()
    train_ok(tmp_path / "single", *clip)
    train_ok(tmp_path, *clip, "parallel=pp-fsdp-tp", "launcher.nproc_per_node=8", "parallel.pp=2", "parallel.tp=2",
             "batch_size=2", "parallel.microbatches=2", "parallel.schedule=interleaved-1f1b",
             "parallel.stages_per_rank=2")
    single, run = only_run_dir(tmp_path / "single" / "outputs"), only_run_dir(tmp_path / "outputs")
    for key in ("loss", "grad_norm", "val_loss"):
        values = [[r[key] for r in read_metrics(d) if key in r] for d in (single, run)]
        assert_losses_close(*values, steps=2 if key == "val_loss" else STEPS, rtol=RTOL,
                            what=f"pp(2) x fsdp(2) x tp(2) {key}")
    assert all(r["grad_norm"] > 0.5 for r in read_metrics(single))  # clipped at every step
    log = (run / "train.log").read_text()
    assert "global batch 4 sequences" in log and "(2 x 2 data-parallel ranks" in log
    copy = tmp_path / "stopped"
    _copy_run(run, copy, keep_step=3)
    result = run_cli("resume", str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _compared(copy) == _compared(run)
    assert json.loads((copy / "resumes.jsonl").read_text().splitlines()[0])["from_step"] == 3


@pytest.mark.slow
@pytest.mark.extended
def test_pp2_x_tp2_with_sequence_parallel_matches_single(runs, base, tmp_path):
    """4 ranks, pp(2) x tp(2) with Megatron SP: the stages exchange the whole sequence, each slices its shards."""
    train_ok(tmp_path, *base, "parallel=pp-fsdp-tp", "launcher.nproc_per_node=4", "parallel.sequence_parallel=true")
    run, single = only_run_dir(tmp_path / "outputs"), runs(("single", 1))
    assert_losses_close(losses(single), losses(run), steps=STEPS, rtol=RTOL, what="pp(2) x tp(2) SP")
    val = [[r["val_loss"] for r in read_metrics(r) if "val_loss" in r] for r in (single, run)]
    assert_losses_close(*val, steps=2, rtol=RTOL, what="pp(2) x tp(2) SP validation")


@pytest.mark.slow
def test_export_of_a_pp_run_is_the_checkpoint_model(pp_run, runs, tmp_path):
    """The export loads in plain transformers with the checkpoint's logits, and is single's model to within what
    6 AdamW steps make of 1e-7 gradient differences."""
    import torch
    from transformers import AutoModelForCausalLM

    from effitrain.engine.export import _run_parts, load_trained_model

    out = tmp_path / "hf"
    result = run_cli("export", str(pp_run), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    cfg, checkpoint, tokenizer = _run_parts(pp_run, step=None)
    mine = load_trained_model(cfg, checkpoint, vocab_size=tokenizer.get_vocab_size())
    ids = torch.tensor([tokenizer.encode("def main(argv):\n    return 0\n").ids])
    single_cfg, single_checkpoint, _ = _run_parts(runs(("single", 1)), step=None)
    single = load_trained_model(single_cfg, single_checkpoint, vocab_size=tokenizer.get_vocab_size())
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, mine(input_ids=ids).logits)
        assert set(hf.state_dict()) == set(single.state_dict())
        for name, value in single.state_dict().items():
            torch.testing.assert_close(hf.state_dict()[name], value, rtol=0, atol=1e-4, msg=name)


REFUSED = {
    "pp-degree": (["parallel=pp-fsdp", "parallel.pp=3", "launcher.nproc_per_node=4"], "does not divide the world size"),
    "pp-all-ranks": ([*PP, "parallel.pp=2", "launcher.nproc_per_node=4"], "parallel=pp uses all 4 ranks"),
    "microbatches": ([*PP, "parallel.microbatches=3"], "parallel.microbatches=3 does not divide batch_size=4"),
    "1f1b-microbatches": ([*PP, "parallel.microbatches=1"], "needs parallel.microbatches >= the 2 stages"),
    "layers": ([*PP, "parallel.schedule=zbv", "parallel.stages_per_rank=2", "model.num_layers=2"],
               "model.num_layers=2 cannot fill 4 pipeline stages"),
    "stages-per-rank": ([*PP, "parallel.schedule=gpipe", "parallel.stages_per_rank=2"],
                        "runs one stage per rank"),
    "zbv": ([*PP, "parallel.schedule=zbv", "parallel.stages_per_rank=3"], "exactly 2 stages per rank"),
    "interleaved": ([*PP, "parallel.schedule=interleaved-1f1b"], "stages_per_rank >= 2"),
    "schedule": ([*PP, "parallel.schedule=dualpipe"], "parallel.schedule='dualpipe' is not one of"),
    "split": ([*PP, "parallel.split=flops"], "parallel.split='flops' is not one of: even, cost"),
    "tied": ([*PP, "model.tie_embeddings=true"], "model.tie_embeddings=true shares the embedding"),
    "precision": ([*PP, "precision=bf16"], "tested in fp32 only"),
    "gpt2": ([*PP, "model=gpt2-124m"], "transformers has no base_model_pp_plan for a 'gpt2' model"),
    # <family> and <family-tied>: a tiny checkpoint of transformers' own family (the `checkpoint` fixture)
    "pretrained-tied": ([*PP, "model.pretrained=<qwen3-tied>"], "model.pretrained's tie_word_embeddings=true shares"),
    "pretrained-moe": ([*PP, "model.pretrained=<qwen3_moe>"], "a mixture-of-experts model ('qwen3_moe') is not split"),
    "pretrained-family": ([*PP, "model.pretrained=<granite>"], "tested for llama, qwen3, mistral, qwen2, gemma, "
                                                               "gemma3_text, phi3, olmo2 models only, not 'granite'"),
    "pretrained-layers": ([*PP, "parallel.schedule=zbv", "parallel.stages_per_rank=2", "model.pretrained=<qwen3>"],
                          "model.pretrained's num_hidden_layers=2 cannot fill 4 pipeline stages"),
    "ac": ([*PP, "parallel.activation_checkpointing=full"], "activation checkpointing and compile"),
    "lora": ([*PP, "compression=lora"], "compression=lora"),
    "muon": ([*PP, "optimizer=muon"], "optimizer=muon"),
    "tp": ([*PP, "parallel.tp=2"], "unknown key 'parallel.tp'"),
    "pp-fsdp-weights-apart": (["parallel=pp-fsdp", "launcher.nproc_per_node=4", "parallel.schedule=zbv",
                               "parallel.stages_per_rank=2", "batch_size=4"],
                              "set parallel.reshard_after_forward=false"),
    "3d-degrees": (["parallel=pp-fsdp-tp", "launcher.nproc_per_node=6"], "parallel.pp=2 x parallel.tp=2 = 4 does not "
                   "divide the world size 6"),
    "3d-dp-shard": (["parallel=pp-fsdp-tp", "launcher.nproc_per_node=8", "parallel.dp_shard=4"],
                    "leaves 2 data-parallel ranks"),
    "3d-heads": (["parallel=pp-fsdp-tp", "launcher.nproc_per_node=8", "parallel.tp=4", "batch_size=4"],
                 "model.num_heads=2 is not divisible by the tensor-parallel degree 4"),
    "3d-weights-apart": (["parallel=pp-fsdp-tp", "launcher.nproc_per_node=4", "parallel.schedule=zero-bubble",
                          "parallel.stages_per_rank=2"], "set parallel.reshard_after_forward=false"),
    "3d-sp": (["parallel=pp-fsdp-tp", "launcher.nproc_per_node=4", "parallel.sequence_parallel=true",
               "data.seq_len=33"], "splits data.seq_len=33 over parallel.tp=2 ranks"),
    "3d-ac": (["parallel=pp-fsdp-tp", "launcher.nproc_per_node=4", "parallel.compile=true"],
              "activation checkpointing and compile"),
    "cp": ([*PP, "parallel.cp=2"], "context parallelism is not built"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_pipelines_do_not_run_is_one_line_before_launch(case, base, checkpoint, capsys):
    args, expected = REFUSED[case]
    args = [re.sub(r"<(.+)>", lambda m: str(checkpoint(m[1])), a) for a in args]
    overrides = [o for o in base if not o.startswith("model.tie_embeddings")] if case == "tied" else base
    code, err = cli_in_process(capsys, "train", *overrides, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def test_stage_split_and_placement():
    from effitrain.parallel.pipeline import Plan, layer_ranges, stage_ids

    assert layer_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert layer_ranges(4, 4) == [range(i, i + 1) for i in range(4)]
    assert stage_ids(0, pp=2, per_rank=2, style="loop") == [0, 2]
    assert stage_ids(1, pp=2, per_rank=2, style="v") == [1, 2]
    cfg = OmegaConf.create({"stages_per_rank": 2, "schedule": "zbv", "split": "even"})
    plan = Plan.of(cfg, rank=0, pp=2, costs=[1] * 4)
    assert plan.ids == [0, 3] and plan.first and plan.last and plan.layers(plan.ids) == {0, 3}
    assert [plan.owner(s) for s in range(4)] == [0, 1, 1, 0]


def test_split_by_cost_gives_the_least_largest_stage_then_the_most_even():
    """split=cost: contiguous, non-empty stages whose largest cost is the least (checked against every split), the
    head's cost on the last block; even costs split as split=even does, but the earlier stages lighter."""
    import itertools
    import random

    from effitrain.parallel.pipeline import block_costs, layer_ranges

    assert block_costs([10, 10, 10, 10], head_weights=16) == [60, 60, 60, 156]
    # the tests' tiny llama (d=32, MLP 64, vocab 512): its head weighs ~1.6 blocks, so 3 blocks | 1 block and head
    assert layer_ranges(4, 2, split="cost", costs=block_costs([10304] * 4, head_weights=16384)) == [
        range(0, 3), range(3, 4)]
    assert layer_ranges(7, 3, split="cost", costs=[1] * 7) == [range(0, 2), range(2, 4), range(4, 7)]
    assert layer_ranges(6, 3, split="cost", costs=[5, 1, 1, 1, 1, 1]) == [range(0, 1), range(1, 3), range(3, 6)]
    rng = random.Random(0)
    for _ in range(200):
        n, stages = rng.randint(1, 9), rng.randint(1, 4)
        if stages > n:
            continue
        costs = [rng.randint(1, 20) for _ in range(n)]
        ranges = layer_ranges(n, stages, split="cost", costs=costs)
        assert [i for r in ranges for i in r] == list(range(n)) and all(len(r) for r in ranges)
        least = min(max(sum(costs[a:b]) for a, b in itertools.pairwise((0, *cuts, n)))
                    for cuts in itertools.combinations(range(1, n), stages - 1))
        assert max(sum(costs[i] for i in r) for r in ranges) == least


# ---------------------------------------------------------------- transformers' own families, model.pretrained

PRETRAINED_STEPS = 4


FAMILIES_AS = {"granite": "llama"}  # checkpoint("granite"): llama's, named granite in its config.json


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    """checkpoint(family) -> a tiny random checkpoint of transformers' own family (2 blocks, untied, its own
    tokenizer), made on first use; "<family>-tied" the same with tie_word_embeddings=true in its config.json;
    a family of FAMILIES_AS another's checkpoint under its name."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            family, _, tied = name.partition("-")
            made[name] = own_checkpoint(tmp_path_factory.mktemp(name), corpus, family=FAMILIES_AS.get(family, family))
            config = made[name] / "config.json"
            changes = {"tie_word_embeddings": True} if tied else {}
            if family in FAMILIES_AS:  # a family only its config.json names: what is refused before launch reads that
                changes |= {"model_type": family, "architectures": [f"{family.capitalize()}ForCausalLM"]}
            config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
        return made[name]
    return get


def _pretrained_args(model: Path, corpus: Path, cache: Path) -> list[str]:
    """A model.pretrained run: 4 sequences of 32 tokens per step, validation at steps 2 and 4."""
    return [f"model.pretrained={model}", "data=text", f"data.paths=[{corpus}]", f"data.cache_dir={cache}",
            "data.seq_len=32", "batch_size=4", f"max_steps={PRETRAINED_STEPS}", "eval_every=2", "eval_batches=1",
            "logging.every=1", "logging.progress=false", "checkpoint=off"]


def _pretrained_runs(tmp: Path, model: Path, corpus: Path, cache: Path, *layout: str) -> tuple[Path, Path]:
    """(single's run, the layout's run) of the checkpoint `model`."""
    for name, extra in (("single", ()), ("layout", layout)):
        (tmp / name).mkdir()
        train_ok(tmp / name, *_pretrained_args(model, corpus, cache), *extra)
    return only_run_dir(tmp / "single" / "outputs"), only_run_dir(tmp / "layout" / "outputs")


def _assert_trains_as_single(single: Path, run: Path, *, what: str) -> None:
    assert_losses_close(losses(single), losses(run), steps=PRETRAINED_STEPS, rtol=RTOL, what=what)
    val = [[r["val_loss"] for r in read_metrics(r) if "val_loss" in r] for r in (single, run)]
    assert_losses_close(*val, steps=2, rtol=RTOL, what=f"{what} validation")


def _stage_tensors(model: Path, *, stages: int) -> list[int]:
    """The parameters of each pipeline stage of a 2-block checkpoint, counted from its safetensors header:
    the embedding on the first stage, the final norm and the head on the last, each block on its stage."""
    from safetensors import safe_open

    from effitrain.parallel.pipeline import layer_ranges

    counts = [0] * stages
    with safe_open(model / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            numel = math.prod(f.get_slice(key).get_shape())
            if key.startswith("model.embed_tokens."):
                counts[0] += numel
            elif key.startswith("model.layers."):
                block = int(key.split(".")[2])
                counts[next(s for s, r in enumerate(layer_ranges(2, stages)) if block in r)] += numel
            else:  # model.norm, lm_head
                counts[-1] += numel
    return counts


def _held(run: Path, rank: int) -> int:
    """The parameters rank `rank` held, from its log's "trainable parameters: N of M" line."""
    log = (run / ("train.log" if rank == 0 else f"rank_{rank}.log")).read_text()
    return int(re.search(rf"\[rank{rank}\] INFO effitrain: trainable parameters: [\d,]+ of ([\d,]+)", log)[1]
               .replace(",", ""))


@pytest.mark.slow
def test_pretrained_qwen3_pp2_trains_as_single_and_each_rank_holds_its_stage(checkpoint, corpus, cache_dir,
                                                                             tmp_path):
    """A tiny random qwen3 checkpoint under pp(2) 1f1b with 2 microbatches: single's per-step and validation losses
    within 1e-5; rank 0 held the embedding and block 0 only, rank 1 block 1, the norm and the head, each read from
    the checkpoint's safetensors tensor by tensor."""
    model = checkpoint("qwen3")
    single, pp = _pretrained_runs(tmp_path, model, corpus, cache_dir, *PP, "parallel.microbatches=2")
    _assert_trains_as_single(single, pp, what="qwen3 pp(2) vs single")
    assert [_held(pp, rank) for rank in (0, 1)] == _stage_tensors(model, stages=2)
    assert "each rank reads its own shards of 1 safetensors file(s)" in (pp / "rank_1.log").read_text()


@pytest.mark.slow
@pytest.mark.extended
def test_pretrained_qwen3_pp2_x_fsdp2_trains_as_single(checkpoint, corpus, cache_dir, tmp_path):
    """4 ranks: 2 stages x 2 FSDP shards, 2 sequences per rank (the same global batch of 4)."""
    single, run = _pretrained_runs(tmp_path, checkpoint("qwen3"), corpus, cache_dir, "parallel=pp-fsdp",
                                   "parallel.pp=2", "launcher.nproc_per_node=4", "batch_size=2",
                                   "parallel.microbatches=2")
    _assert_trains_as_single(single, run, what="qwen3 pp(2) x fsdp(2) vs single")


# the families under pp beside test_own_tokenizer's (gemma's own embedding module scales the embeddings: stage 0 only)
STAGE_FAMILIES = {**FAMILIES, "qwen2": ("Qwen2Config", {}), "gemma": ("GemmaConfig", {"head_dim": 8}),
                  "granite": ("GraniteConfig", {"embedding_multiplier": 3.0})}


@pytest.mark.parametrize("family", [*PP_FAMILIES, "granite"])
def test_stages_run_in_turn_are_the_whole_model(family):
    """Each family effitrain splits (model.PP_FAMILIES) gives the whole model's logits when its 2 stages run one after
    the other; granite, whose base model scales the embeddings inside its forward (so every stage would), does not:
    why the families are a tested list, not whatever has a base_model_pp_plan."""
    import copy

    import torch
    import transformers

    from effitrain.parallel.pipeline import _as_stage, _keep, layer_ranges

    name, extra = STAGE_FAMILIES[family]
    config = getattr(transformers, name)(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         use_cache=False, pad_token_id=None, **extra)
    torch.manual_seed(0)
    whole = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 100, (2, 16))
    h = ids
    with torch.no_grad():
        for s, blocks in enumerate(layer_ranges(3, 2)):
            stage = copy.deepcopy(whole)
            _keep(stage, layers=set(blocks), first=s == 0, last=s == 1)
            _as_stage(stage)
            h = stage(h)
        same = torch.allclose(h, whole(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert same == (family in PP_FAMILIES), family
