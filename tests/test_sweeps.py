"""Sweeps: Hydra's grammar through `effitrain train -m` (jobs listed by Hydra's own sweeper and checked before any
starts), failed jobs as results, compare's table and plots, the Optuna sweeper (pruning, resuming a killed study),
the local-parallel launcher and the SLURM preset's batch script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_losses_close, losses, read_metrics, run_cli
from effitrain.commands.compare import pareto_front
from effitrain.compose import compose_all, normalize

# 4 steps, an evaluation every 2: what a sweep needs to have something to compare and prune
STEPS = ["max_steps=4", "eval_every=2"]


def planned(*args: str) -> list:
    """The configs of every job a sweep would run (nothing trains)."""
    return list(compose_all(normalize(list(args)), multirun=True))


def summary(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "summary.json").read_text())


def test_hydra_grammar_lists_the_jobs_hydra_would_run():
    assert [c.schedule.name for c in planned("schedule=glob(c*)")] == ["constant", "cosine"]
    assert [c.seed for c in planned("seed=range(1,4)")] == [1, 2, 3]
    assert [c.schedule.name for c in planned("schedule=sort(wsd,cosine,linear)")] == ["cosine", "linear", "wsd"]
    assert [(c.precision.name, c.optimizer.lr) for c in planned("precision=choice(fp32,bf16)", "optimizer.lr=1e-3")] \
        == [("fp32", 1e-3), ("bf16", 1e-3)]
    # the basic sweeper's own params (hydra.sweeper.params) join the command line's
    assert [(c.seed, c.schedule.name) for c in planned("hydra.sweeper.params.seed=1,2", "schedule=glob(w*)")] == \
        [(1, "wsd"), (2, "wsd")]
    # Optuna's jobs are not known in advance: every choice and both ends of every interval are checked
    bounds = planned("hydra/sweeper=optuna", "optimizer.lr=tag(log,interval(1e-4,1e-2))",
                     "hydra.sweeper.params.precision=choice(fp32,bf16)")
    assert sorted((c.optimizer.lr, c.precision.name) for c in bounds) == \
        [(1e-4, "bf16"), (1e-4, "fp32"), (1e-2, "fp32")]


BAD_SWEEPS = {
    "unknown option in glob-free choice": (["precision=choice(fp32,fp99)"], "unknown precision option 'fp99'"),
    "interval without a search sweeper": (["optimizer.lr=interval(1e-4,1e-2)"], "need a search sweeper"),
    "optuna choice outside the schema": (["hydra/sweeper=optuna", "hydra.sweeper.params.precision=choice(fp32,fp99)"],
                                         "unknown precision option 'fp99'"),
    "optuna interval of the wrong type": (["hydra/sweeper=optuna", "max_steps=interval(1.5,3.5)"], "max_steps: Value"),
    "optuna without a search space": (["hydra/sweeper=optuna", "seed=3"], "needs a search space"),
    "optuna unknown objective": (["hydra/sweeper=optuna", "seed=choice(1,2)", "hydra.sweeper.objective=speed"],
                                 "choose from final_val_loss"),
    "optuna grid over an interval": (["hydra/sweeper=optuna", "hydra.sweeper.sampler=grid",
                                      "optimizer.lr=interval(0,1)"], "sampler=grid needs a finite grid"),
    "pruning a multi-objective search": (["hydra/sweeper=optuna", "seed=choice(1,2)",
                                          "hydra.sweeper.pruner.kind=median",
                                          "hydra.sweeper.objective=[final_val_loss,median_tokens_per_s]"],
                                         "prunes single-objective searches only"),
}


@pytest.mark.parametrize("args,expected", BAD_SWEEPS.values(), ids=BAD_SWEEPS.keys())
def test_bad_sweep_is_one_line_exit_2_before_anything_starts(tmp_path, args, expected):
    out = run_cli("train", "-m", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effitrain: error: ") and expected in lines[0], out.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.extended
def test_glob_by_range_sweep_runs_each_job_and_compare_plots_them(tmp_path, tiny):
    sweep = tmp_path / "sweep"
    out = run_cli("train", "-m", "schedule=glob(c*)", "seed=range(1,3)", *tiny(*STEPS), f"hydra.sweep.dir={sweep}",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = summary(sweep)["rows"]
    assert [r["overrides"] for r in rows] == ["schedule=constant seed=1", "schedule=constant seed=2",
                                              "schedule=cosine seed=1", "schedule=cosine seed=2"]
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert (sweep / "compare" / "data.json").exists()  # written when the sweep ended

    out = run_cli("compare", str(sweep), "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    data = json.loads((tmp_path / "cmp" / "data.json").read_text())
    assert [r["label"] for r in data["runs"]] == [r["overrides"] for r in rows]
    for run, row in zip(data["runs"], rows, strict=True):
        records = read_metrics(Path(row["run_dir"]))
        assert run["loss"] == [r["loss"] for r in records] and run["step"] == [1, 2, 3, 4]
        assert run["val_loss"] == [r["val_loss"] for r in records if "val_loss" in r] and run["val_step"] == [2, 4]
        assert run["tokens"] == [128 * s for s in run["step"]]  # 4 sequences x 32 tokens per step
        assert data["per_run"]["median_tokens_per_s"][run["label"]] == row["median_tokens_per_s"]
    points = [(p["tokens_per_s"], p["final_val_loss"]) for p in data["pareto"]["points"]]
    front = {data["pareto"]["points"][i]["label"] for i in pareto_front(points)}
    assert set(data["pareto"]["front"]) == front and front
    for name in ("loss_vs_step", "loss_vs_tokens", "loss_vs_time_s", "tokens_per_s", "peak_memory", "pareto"):
        png = (tmp_path / "cmp" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "schedule=cosine seed=2" in table and "best_val_loss" in table


def test_compare_labels_runs_by_what_differs_in_their_configs(tmp_path):
    from effitrain.commands.compare import Run, labels

    def run(name, **config):
        (tmp_path / name).mkdir()
        return Run(tmp_path / name, config, [], {}, "ok")

    runs = [run("a", **{"schedule.name": "cosine", "schedule.min_lr_ratio": 0.1, "seed": 1}),
            run("b", **{"schedule.name": "constant", "seed": 1}), run("c", **{"schedule.name": "constant", "seed": 2})]
    assert labels(runs) == ["seed=1 schedule=cosine", "seed=1 schedule=constant", "seed=2 schedule=constant"]


def test_pareto_front_keeps_runs_no_other_beats():
    points = [(100.0, 3.0), (200.0, 3.5), (150.0, 2.9), (90.0, 3.1), (200.0, 3.6)]
    assert pareto_front(points) == [1, 2]


@pytest.mark.extended
def test_failed_jobs_are_results_and_the_sweep_goes_on(tmp_path, tiny):
    """A corrupt checkpoint passes the checks made before launch (its config.json is sound, a weights file is there)
    and fails when the model is loaded: its weights file is not safetensors."""
    broken = tmp_path / "broken-ckpt"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, '
                                        '"num_attention_heads": 2, "intermediate_size": 128, "vocab_size": 4096}')
    (broken / "model.safetensors").write_bytes(b"not safetensors" * 8)
    sweep = tmp_path / "sweep"
    out = run_cli("train", "-m", "seed=range(1,4)", f"model.pretrained=null,{broken}", *tiny(*STEPS),
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-4000:]  # some jobs failed (how many: the summary)
    result = summary(sweep)
    assert (result["ok"], result["failed"]) == (3, 3)
    for row in result["rows"]:
        if "pretrained=null" in row["overrides"]:
            assert row["status"] == "ok" and row["final_val_loss"] is not None
        else:
            assert row["status"] == "failed" and "\n" not in row["reason"], row
            assert row["reason"].split(":")[0].endswith("Error"), row["reason"]
    assert sorted(r["overrides"].split()[0] for r in result["rows"] if r["status"] == "ok") == \
        ["seed=1", "seed=2", "seed=3"]
    assert "3 of 6 jobs failed" in out.stdout


def _optuna_command(tiny, sweep: Path) -> list[str]:
    return ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6", "hydra.sweeper.pruner.kind=median",
            "hydra.sweeper.params.optimizer.lr=tag(log,interval(1e-5,1e-1))",
            "hydra.sweeper.params.precision=choice(fp32,bf16)", *tiny(*STEPS), f"hydra.sweep.dir={sweep}"]


@pytest.mark.extended
def test_optuna_search_prunes_and_a_killed_study_continues(tmp_path, tiny):
    import optuna

    sweep = tmp_path / "study"
    command = _optuna_command(tiny, sweep)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "effitrain.cli", *command], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not (sweep / "2" / ".hydra").exists() and first.poll() is None:  # killed during trial 2
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done_before = {d.name for d in sweep.iterdir() if (d / "summary.json").exists()}

    out = run_cli(*command, cwd=tmp_path)  # the same command again
    assert out.returncode == 0, out.stderr[-4000:]
    assert "trials already done, continuing" in out.stdout + out.stderr
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{sweep / 'optuna.db'}")
    counted = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("interrupted")]
    assert len(counted) == 6
    assert [t.number for t in study.trials if t.user_attrs.get("interrupted")] == [2]
    rows = {r["job"]: r for r in summary(sweep)["rows"]}
    assert rows["2"]["status"] == "interrupted"
    assert done_before <= {job for job, r in rows.items() if r["status"] == "ok"}  # not rerun
    pruned = [r for r in rows.values() if r["status"] == "pruned"]
    assert pruned, rows
    for row in pruned:  # stopped at an evaluation before the last step
        steps = [r["step"] for r in read_metrics(Path(row["run_dir"]))]
        assert steps[-1] < 4 and row["reason"].startswith("TrialPruned: pruned at step")
    best = json.loads((sweep / "optuna.json").read_text())["best"]
    assert best[0]["final_val_loss"] == min(r["final_val_loss"] for r in rows.values() if r["status"] == "ok")


@pytest.mark.extended
def test_local_parallel_launcher_runs_jobs_concurrently(tmp_path, tiny):
    sweep = tmp_path / "sweep"
    out = run_cli("train", "-m", "hydra/launcher=local-parallel", "seed=1,2", *tiny(*STEPS),
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = summary(sweep)["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # each job from its start (Hydra saves its config) to its end (summary.json): the two intervals overlap
    spans = [((Path(r["run_dir"]) / ".hydra" / "config.yaml").stat().st_mtime,
              (Path(r["run_dir"]) / "summary.json").stat().st_mtime) for r in rows]
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a, spans


def test_slurm_preset_writes_the_batch_script_its_keys_say(tmp_path, monkeypatch):
    """The real hydra-submitit SLURM launcher, built from the preset, up to the sbatch file it would submit."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    from effitrain.compose import config_dir, register_configs

    scripts = []

    def capture(executor, fn, *iterables):
        scripts.append(executor._executor._make_submission_file_text(command="python -m submitit.core._submit X",
                                                                     uid="test"))
        raise RuntimeError("captured")

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    monkeypatch.chdir(tmp_path)
    fake_bin = tmp_path / "bin"  # submitit looks for srun before it builds a SLURM executor; nothing runs it
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "launcher.nnodes=2", "launcher.nproc_per_node=4",
                                "launcher.rdzv_endpoint=node0:29500", "hydra.launcher.partition=gpu",
                                "hydra.launcher.account=proj42", "hydra.launcher.timeout_min=90",
                                f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks()), task_function=lambda c: None,
            config=cfg)
        with pytest.raises(RuntimeError, match="captured"):
            launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    script = scripts[0]
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --time=90"):
        assert line in script.splitlines(), (line, script)
    assert f"#SBATCH --output={tmp_path / 'sweep'}/.submitit/" in script  # logs beside the sweep's jobs
    assert "srun --unbuffered" in script and script.rstrip().endswith("python -m submitit.core._submit X")


@pytest.mark.extended
def test_resumed_sweep_skips_finished_jobs_and_continues_unfinished_ones(tmp_path, tiny):
    import shutil

    sweep = tmp_path / "sweep"
    out = run_cli("train", "-m", "seed=1,2", *tiny(*STEPS), "checkpoint.every=2", f"hydra.sweep.dir={sweep}",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    finished = sweep / "0" / "summary.json"
    finished_at, full = finished.stat().st_mtime_ns, losses(sweep / "1")
    # job 1 as a sweep killed after its step-2 checkpoint leaves it: no summary, no later checkpoint
    (sweep / "1" / "summary.json").unlink()
    shutil.rmtree(sweep / "1" / "checkpoints" / "step-4")

    out = run_cli("resume", str(sweep), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"{sweep / '0'} finished before: skipped" in out.stdout
    assert finished.stat().st_mtime_ns == finished_at
    assert "resumed from" in (sweep / "1" / "train.log").read_text()
    assert_losses_close(losses(sweep / "1"), full, steps=4, rtol=1e-6, what="resumed job")
    assert [r["status"] for r in summary(sweep)["rows"]] == ["ok", "ok"]


def test_sweep_resume_reruns_only_the_sweeps_own_command(tmp_path):
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"hydra": [], "task": ["seed=1,2"]}}}),
                   sweep / "multirun.yaml")
    out = run_cli("train", "-m", "seed=3,4", f"sweep.resume={sweep}", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"effitrain: error: {sweep} was swept with: seed=1,2; sweep.resume reruns that "
                                  "command (give the same overrides, or none)")
    out = run_cli("resume", str(tmp_path), cwd=tmp_path)  # not a sweep: resumed as a run, which it is not either
    assert out.returncode == 2 and "has no saved config" in out.stderr, out.stderr


@pytest.mark.extended
def test_multi_objective_search_prints_and_saves_its_pareto_set(tmp_path, tiny):
    sweep = tmp_path / "study"
    out = run_cli("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler=random",
                  "hydra.sweeper.objective=[final_val_loss,median_tokens_per_s]", "seed=choice(1,2,3)",
                  *tiny("max_steps=2", "eval_every=2"), f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Pareto set:" in out.stdout
    saved = json.loads((sweep / "optuna.json").read_text())
    assert saved["objectives"] == ["final_val_loss", "median_tokens_per_s"] and saved["trials"]["complete"] == 2
    rows = {int(r["job"]): r for r in summary(sweep)["rows"]}
    points = [(rows[t]["median_tokens_per_s"], rows[t]["final_val_loss"]) for t in sorted(rows)]
    assert sorted(b["trial"] for b in saved["best"]) == sorted(pareto_front(points))
    for best in saved["best"]:  # the values Optuna was told are the jobs' own summaries
        assert best["final_val_loss"] == rows[best["trial"]]["final_val_loss"]


def test_slurm_rendezvous_is_the_allocations_first_node(monkeypatch):
    from conftest import compose
    from effitrain.errors import UsageError
    from effitrain.launcher import first_host
    from effitrain.launcher.launch import launch_config

    assert [first_host(n) for n in ("gpu-[003-005,009],cpu1", "n1,n2", "node7", "a[1,3]")] == \
        ["gpu-003", "n1", "node7", "a1"]
    launcher = compose(["launcher.nnodes=2", "launcher.rdzv_endpoint=slurm"]).launcher
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-[003-004]")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    config = launch_config(launcher, device="cpu")
    assert (config.rdzv_endpoint, config.run_id, config.min_nodes, config.max_nodes) == \
        ("gpu-003:29500", "slurm-77", 2, 2)
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    with pytest.raises(UsageError, match="runs inside a SLURM allocation"):
        launch_config(launcher, device="cpu")
