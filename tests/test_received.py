"""A run or sweep directory someone else made cannot run code or reach out (effitrain.received): each payload is
refused in one line, exit 2, before anything runs, and what reaches beyond the directory runs only with
--allow-external. Refusals only: nothing here trains, and nothing connects anywhere."""

from __future__ import annotations

import json

import pytest

from conftest import cli_in_process, compose, run_cli

# a sweep's own saved task overrides (nothing here runs them: each test is refused first, or its jobs are finished)
TASK = ["seed=1,2", "max_steps=2", "batch_size=2", "data.seq_len=32"]
NEVER = "a received sweep never replays that, no flag allows it"
FLAG = "only with --allow-external"


def foreign_sweep(path, *, hydra=(), task=TASK, finished=False):
    """A sweep directory as `effitrain train -m` leaves one: what resume reads of multirun.yaml is its saved command
    (the rest of the file is Hydra's record of what it composed, never read). `finished`: both jobs have their
    summary.json, so a resume that gets past the checks skips them and trains nothing."""
    from omegaconf import OmegaConf

    path.mkdir(parents=True)
    saved = {"hydra": [f"hydra.sweep.dir={path}", "hydra.mode=MULTIRUN", *hydra], "task": list(task)}
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": saved}}), path / "multirun.yaml")
    for job in range(2) if finished else ():
        (path / str(job) / ".hydra").mkdir(parents=True)
        (path / str(job) / ".hydra" / "config.yaml").write_text("{}\n")
        (path / str(job) / "summary.json").write_text(json.dumps({"final_val_loss": 1.0}))
    return path


def refused(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2 and stderr.count("\n") == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)


def test_a_callback_payload_is_refused_and_never_runs(tmp_path):
    """Hydra instantiates hydra.callbacks at start: shutil.copyfile of a file beside the sweep onto a sentinel ran
    before this policy existed. Through the real command: refused, and the sentinel never appears."""
    sentinel = tmp_path / "SENTINEL"
    sweep = tmp_path / "sweep"
    payload = ["+hydra.callbacks.x._target_=shutil.copyfile", f"+hydra.callbacks.x.src={sweep}/payload.txt",
               f"+hydra.callbacks.x.dst={sentinel}"]
    foreign_sweep(sweep, hydra=payload)
    (sweep / "payload.txt").write_text("ran\n")
    for extra in ((), ("--allow-external",)):
        out = run_cli("resume", str(sweep), *extra, cwd=tmp_path)
        refused(out.returncode, out.stderr, "sets a Hydra callback", NEVER)
        assert not sentinel.exists()
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml", "payload.txt"]  # nothing written


@pytest.mark.parametrize("hydra, task, message", [
    ((), [*TASK, "+hydra.callbacks.x._target_=shutil.copyfile"], "sets a Hydra callback"),  # Hydra sorts by key
    ((), [*TASK, "data.sources={a:{_target_:os.system}}"], "names a _target_"),
    ((), [*TASK, "name=${oc.env:HOME}"], "calls a resolver"),
    (("--experimental-rerun=x.pickle",), TASK, "is not a Hydra override"),  # Hydra's flag that unpickles a file
    (("+hydra.job.env_set.LD_PRELOAD=x.so",), TASK, "is not a Hydra setting effitrain documents"),
    (("hydra/launcher=slurm", "hydra.launcher.setup=[touch_x]"), TASK, "is not a Hydra setting effitrain documents"),
    (("hydra/job_logging=default",), TASK, "is not a Hydra setting effitrain documents"),
    (('++hydra.sweeper.params.hydra.job.env_set.LD_PRELOAD="x.so"',), TASK[1:],  # a searched key is a job's override
     "is not a Hydra setting effitrain documents"),
    (("hydra/sweeper@hydra.launcher=optuna",), TASK, "places a config at another package"),
    ((), [*TASK, "model=../../../x"], "unknown model option"),  # Hydra would read ../../../x.yaml of theirs
])
def test_what_could_run_code_is_refused_even_with_the_flag(tmp_path, capsys, hydra, task, message):
    sweep = foreign_sweep(tmp_path / "sweep", hydra=hydra, task=task)
    for extra in ((), ("--allow-external",)):
        code, stderr = cli_in_process(capsys, "resume", str(sweep), *extra)
        refused(code, stderr, message)
    assert [p.name for p in sweep.iterdir()] == ["multirun.yaml"]


@pytest.mark.parametrize("text, message", [
    ("- seed=1\n", "has no saved command"), ("hydra: [1]\n", "has no saved command"),
    ("hydra:\n  overrides:\n    hydra: []\n    task: [1]\n", "has no saved command"),
    ("hydra: {overrides: {hydra: [], task: [\"seed=1\"]\n", "is not a readable config")])
def test_a_damaged_multirun_yaml_is_one_line(tmp_path, capsys, text, message):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "multirun.yaml").write_text(text)
    refused(*cli_in_process(capsys, "resume", str(tmp_path / "sweep")), message)


def test_a_rendezvous_needs_the_flag(tmp_path):
    """A task override that would join a rendezvous elsewhere: refused through the real command; with the flag the
    command passes the checks (not run here: it would connect)."""
    from effitrain.received import sweep_command

    task = [*TASK, "launcher.rdzv_endpoint=evil.example:29500", "launcher.nnodes=2", "parallel=ddp"]
    sweep = foreign_sweep(tmp_path / "sweep", task=task)
    out = run_cli("resume", str(sweep), cwd=tmp_path)
    refused(out.returncode, out.stderr, "asks for a multi-node rendezvous", "evil.example:29500", FLAG)
    assert "launcher.rdzv_endpoint=evil.example:29500" in sweep_command(sweep, allow_external=True)


@pytest.mark.parametrize("storage", ["mysql://user@evil.example/db", "sqlite:////tmp/elsewhere/optuna.db",
                                     "sqlite:///{sweep}/../optuna.db", "sqlite:///{sweep}/optuna.db?mode=ro"])
def test_an_optuna_storage_outside_the_sweep_needs_the_flag(tmp_path, capsys, storage):
    from effitrain.received import sweep_command

    sweep = tmp_path / "sweep"
    hydra = ("hydra/sweeper=optuna", f"hydra.sweeper.storage='{storage.format(sweep=sweep)}'")
    foreign_sweep(sweep, hydra=hydra, task=["seed=choice(1,2)", *TASK[1:]])
    code, stderr = cli_in_process(capsys, "resume", str(sweep))
    refused(code, stderr, "keeps its Optuna study in hydra.sweeper.storage", FLAG)
    assert sweep_command(sweep, allow_external=True)[-1] == f"hydra.sweep.dir={sweep}"


def test_the_storage_url_is_refused_through_the_real_command(tmp_path, capsys):
    sweep = foreign_sweep(tmp_path / "sweep", hydra=("hydra/sweeper=optuna",
                                                     "hydra.sweeper.storage=postgresql://user@evil.example/db"),
                          task=["seed=choice(1,2)", *TASK[1:]])
    out = run_cli("resume", str(sweep), cwd=tmp_path)
    refused(out.returncode, out.stderr, "hydra.sweeper.storage='postgresql://user@evil.example/db'", FLAG)
    sweep = foreign_sweep(tmp_path / "interpolated", hydra=("hydra/sweeper=optuna", "hydra.sweeper.storage=${name}"),
                          task=["seed=choice(1,2)", *TASK[1:], "name=postgresql:"])  # the resolved value counts
    code, stderr = cli_in_process(capsys, "resume", str(sweep))
    refused(code, stderr, "hydra.sweeper.storage='postgresql:'", FLAG)


def test_what_stays_inside_passes_without_the_flag(tmp_path):
    """The Optuna study in a sqlite file inside the sweep, a search space, the local launcher: nothing to allow."""
    from effitrain.received import sweep_command

    sweep = tmp_path / "sweep"
    hydra = ("hydra/sweeper=optuna", f"hydra.sweeper.storage=sqlite:///{sweep}/study.db", "hydra.sweeper.n_trials=3",
             '++hydra.sweeper.params.optimizer.lr="interval(1e-4,1e-2)"', "hydra/launcher=local-parallel")
    foreign_sweep(sweep, hydra=hydra, task=TASK[1:])
    assert sweep_command(sweep) == ["-m", "hydra.mode=MULTIRUN", *hydra, *TASK[1:], f"hydra.sweep.dir={sweep}"]


@pytest.mark.parametrize("hydra, task, message", [
    (("hydra/launcher=slurm", "hydra.launcher.partition=gpu"), TASK, "submits its jobs to SLURM"),
    ((), [*TASK, "checkpoint.dir=/tmp/elsewhere"], "keeps its checkpoints outside"),
    ((), [*TASK, "data.cache_dir=/tmp/not-a-cache"], "writes its token cache outside"),
    (('++hydra.sweeper.params.launcher.nnodes="choice(1,2)"', "hydra/sweeper=optuna"), TASK[1:],
     "asks for a multi-node rendezvous"),  # found in the jobs the search could run, not only the fixed overrides
])
def test_what_reaches_out_needs_the_flag(tmp_path, capsys, hydra, task, message):
    sweep = foreign_sweep(tmp_path / "sweep", hydra=hydra, task=task)
    code, stderr = cli_in_process(capsys, "resume", str(sweep))
    refused(code, stderr, message, FLAG)


def test_resume_sweep_dir_takes_the_flag(tmp_path, capsys):
    """`effitrain resume SWEEP_DIR --allow-external` runs the sweep (its jobs finished: skipped, nothing trains);
    without the flag the same directory is refused. Another argument is still refused."""
    sweep = foreign_sweep(tmp_path / "sweep", task=[*TASK, f"checkpoint.dir={tmp_path / 'elsewhere'}"], finished=True)
    code, stderr = cli_in_process(capsys, "resume", str(sweep))
    refused(code, stderr, "keeps its checkpoints outside", FLAG)
    out = run_cli("resume", str(sweep), "--allow-external", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{sweep / '0'} finished before: skipped" in out.stdout and f"{sweep / '1'} finished before" in out.stdout
    assert not (tmp_path / "elsewhere").exists()
    code, stderr = cli_in_process(capsys, "resume", str(sweep), "seed=3", "--allow-external")
    refused(code, stderr, "reruns the sweep's own command; drop seed=3")
    code, stderr = cli_in_process(capsys, "train", "seed=3", "--allow-external")
    refused(code, stderr, "give it with sweep.resume=SWEEP_DIR")


def foreign_run(path, *overrides: str):
    """A run directory's saved config (.hydra/config.yaml) as effitrain train writes it; no checkpoint."""
    from omegaconf import OmegaConf

    (path / ".hydra").mkdir(parents=True)
    cfg = compose(["max_steps=2", "batch_size=2", "data.seq_len=32", *overrides])
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml")
    return path


def test_a_run_dirs_checkpoints_elsewhere_need_the_flag(tmp_path):
    """A saved checkpoint.dir pointing into another run would make resume load, write and rotate that run's
    checkpoints: refused through the real command; with the flag, the policy passes (and this one has none)."""
    other = tmp_path / "other-run" / "checkpoints"
    run_dir = foreign_run(tmp_path / "run", f"checkpoint.dir={other}")
    out = run_cli("resume", str(run_dir), cwd=tmp_path)
    refused(out.returncode, out.stderr, "keeps its checkpoints outside", str(other), FLAG)
    out = run_cli("resume", str(run_dir), "--allow-external", cwd=tmp_path)
    refused(out.returncode, out.stderr, "has no complete checkpoint")
    assert not (run_dir / "resumes.jsonl").exists()


def test_a_run_dirs_own_places_pass(tmp_path, capsys):
    """Checkpoints and a cache inside the run directory, the default cache, or a directory that already is an
    effitrain cache here: the policy passes (the refusal that follows is resume's own: no checkpoint)."""
    from effitrain.received import load_run_config

    cache = tmp_path / "cache"
    (cache / "listings").mkdir(parents=True)
    for i, overrides in enumerate([(), ("checkpoint.dir=RUN/ckpt", "data.cache_dir=RUN/cache"),
                                   (f"data.cache_dir={cache}",)]):
        run_dir = tmp_path / f"run{i}"
        foreign_run(run_dir, *(o.replace("RUN", str(run_dir)) for o in overrides))
        load_run_config(run_dir)
        code, stderr = cli_in_process(capsys, "reproduce", str(run_dir))
        refused(code, stderr, "has no metrics.jsonl")
    run_dir = foreign_run(tmp_path / "run-new-cache", f"data.cache_dir={tmp_path / 'new'}")
    code, stderr = cli_in_process(capsys, "reproduce", str(run_dir))
    refused(code, stderr, "writes its token cache outside", FLAG)
    (run_dir / ".hydra" / "config.yaml").write_text("- a list\n")
    refused(*cli_in_process(capsys, "resume", str(run_dir)), "is not a config (a mapping")


def test_name_is_one_file_name(tmp_path, capsys):
    """`name` ends the run directory's name and starts its log: a path separator or a newline is refused at
    `effitrain train`, before anything is written."""
    out = run_cli("train", "name=../escape", cwd=tmp_path)
    refused(out.returncode, out.stderr, "name='../escape' names the run directory")
    assert list(tmp_path.iterdir()) == []
    for value, shown in [("'a\nb'", "'a\\nb'"), ("a/b", "'a/b'"), ("'a\\b'", "'a\\\\b'"), ("..", "'..'")]:
        code, stderr = cli_in_process(capsys, "train", f"name={value}", "max_steps=2")
        refused(code, stderr, f"name={shown} names the run directory")
    code, stderr = cli_in_process(capsys, "train", "model.name='tiny\r'")
    refused(code, stderr, "model.name='tiny\\r' is written into the run's log")
    code, stderr = cli_in_process(capsys, "train", "eval.tasks=['next-line\nx']")
    refused(code, stderr, "eval.tasks: 'next-line\\nx' names a task file")
