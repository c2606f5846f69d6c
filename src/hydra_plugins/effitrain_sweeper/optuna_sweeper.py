"""effitrain's Optuna sweeper for Hydra (hydra/sweeper=optuna), on current Optuna.

Why not hydra-optuna-sweeper: its 1.3.0 pins optuna<3, its sqlite storage breaks under SQLAlchemy 2, and it has no
pruning. This one is small: it asks the study for n_jobs trials at a time, launches them with whatever launcher is
configured (trial N is job N, so a job finds its trial for pruning), and tells the study each job's objective from
the summary the job returns. The study lives in storage (sqlite in the sweep directory by default), so rerunning
the same command continues it: trials a killed sweep left running are marked interrupted and not counted.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

from effitrain.commands.sweep import record_outcome
from effitrain.errors import IOFailure, RunStopped, UsageError, exit_one_line
from effitrain.sweep import trials as search


class OptunaSweeper(Sweeper):
    def __init__(self, *, n_trials: int, n_jobs: int, sampler: str, seed, objective, pruner, study_name: str,
                 storage, sweep_dir: str, params) -> None:
        self.n_trials, self.n_jobs, self.sampler, self.seed = n_trials, n_jobs, sampler, seed
        self.objectives = [objective] if isinstance(objective, str) else list(objective)
        self.pruner_cfg, self.study_name, self.storage = pruner, study_name, storage
        # `hydra.sweeper.params.optimizer.lr=...` nests; the searched key is the dotted path
        self.params = _dotted(OmegaConf.to_container(params)) if params is not None else {}
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def _space(self, arguments: list[str]):
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params, fixed = search.search_space(parser, self.params, arguments)
        if not params:
            raise UsageError("hydra/sweeper=optuna needs a search space: hydra.sweeper.params.KEY=choice(...) or "
                             "KEY=interval(...) on the command line")
        directions = search.directions(self.objectives)
        if self.n_trials < 1 or self.n_jobs < 1:
            raise UsageError(f"hydra.sweeper.n_trials={self.n_trials} and n_jobs={self.n_jobs} must be >= 1")
        if len(directions) > 1 and self.pruner_cfg.kind != "none":
            raise UsageError("Optuna prunes single-objective searches only: hydra.sweeper.pruner.kind=none "
                             f"with objective={self.objectives}")
        return params, fixed, directions

    def planned_jobs(self, arguments: list[str]) -> list[list[str]]:
        """The jobs that bound the search (each choice, both ends of each range), for the CLI to check up front;
        every other param at its first value."""
        params, fixed, _ = self._space(arguments)
        search.build_sampler(self.sampler, seed=self.seed, params=params)
        search.build_pruner(self.pruner_cfg)
        first = {p.key: p.bounds()[0] for p in params}
        jobs = []
        for p in params:
            for value in p.bounds():
                job = fixed + [f"{k}={value if k == p.key else v}" for k, v in first.items()]
                if job not in jobs:
                    jobs.append(job)
        return jobs

    def sweep(self, arguments: list[str]):
        url = search.storage_url(self.storage, Path(self.config.hydra.sweep.dir))
        with _one_line_stops(), _storage_errors(url):
            return self._sweep(arguments, url)

    def _sweep(self, arguments: list[str], url: str):
        import optuna

        params, fixed, directions = self._space(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        made = not sweep_dir.exists()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:  # the study opens first: a storage that cannot be used leaves no sweep directory behind
            study = optuna.create_study(
                study_name=self.study_name, storage=url,
                sampler=search.build_sampler(self.sampler, seed=self.seed, params=params),
                pruner=search.build_pruner(self.pruner_cfg), directions=directions, load_if_exists=True)
        except BaseException:
            if made:  # only the directory this call made (at most its own optuna.db in it)
                shutil.rmtree(sweep_dir, ignore_errors=True)
            raise
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        self._check_same_search(study, params, fixed)
        self._mark_interrupted(study, sweep_dir)
        distributions = {p.key: p.distribution for p in params}
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished()
                   and not t.user_attrs.get("interrupted"))
        if done:
            print(f"study {self.study_name}: {done} of {self.n_trials} trials already done, continuing")
        while done < self.n_trials:
            batch = [study.ask(distributions) for _ in range(min(self.n_jobs, self.n_trials - done))]
            assert [t.number for t in batch] == list(range(batch[0].number, batch[0].number + len(batch)))
            overrides = [fixed + [f"{k}={search.format_value(v)}" for k, v in t.params.items()] for t in batch]
            results = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
            for trial, result in zip(batch, results, strict=True):
                self._tell(study, trial, result)
            done += len(batch)
        self._report(study, sweep_dir)
        return study

    def _check_same_search(self, study, params, fixed) -> None:
        """A study continued by a rerun must search the same space with the same fixed overrides."""
        space = {"params": sorted(p.text for p in params), "fixed": sorted(fixed), "objective": self.objectives}
        if "search" not in study.user_attrs:
            study.set_user_attr("search", space)
        elif study.user_attrs["search"] != space:
            raise UsageError(f"study {self.study_name!r} in {self.config.hydra.sweep.dir} searched "
                             f"{study.user_attrs['search']}, not {space}: set hydra.sweeper.study_name=NEW to start "
                             "another study")

    def _mark_interrupted(self, study, sweep_dir: Path) -> None:
        """Trials a killed sweep left running: failed, marked interrupted, not counted; their jobs say so."""
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study.tell(t.number, state=TrialState.FAIL)
            record_outcome(sweep_dir / str(t.number), "interrupted", "the sweep was stopped during this trial")

    def _tell(self, study, trial, result) -> None:
        from optuna.trial import TrialState

        if result.status == JobStatus.FAILED:  # raised past the task (it records its own failures)
            study.tell(trial, state=TrialState.FAIL)
            return
        summary = result.return_value or {}
        status = summary.get("status", "ok")
        if status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            return
        values = [summary.get(name) for name in self.objectives]
        if status != "ok" or any(v is None for v in values):
            trial.set_user_attr("reason", summary.get("reason") or f"no value for {self.objectives}")
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, values)

    def _report(self, study, sweep_dir: Path) -> None:
        """The best trial (or the Pareto set of a multi-objective search): printed and saved as optuna.json."""
        import json

        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = study.best_trials if complete else []
        rows = [{"trial": t.number, "params": t.params, **dict(zip(self.objectives, t.values, strict=True))}
                for t in best]
        counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                  for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        (sweep_dir / "optuna.json").write_text(json.dumps({"study": self.study_name, "objectives": self.objectives,
                                                           "trials": counts, "best": rows}, indent=2))
        what = "Pareto set" if len(self.objectives) > 1 else "best trial"
        print(f"study {self.study_name}: {counts} | {what}:")
        for row in rows:
            print("  " + " ".join(f"{k}={v}" for k, v in row.items()))


@contextmanager
def _one_line_stops():
    """A stop raised in the sweeper (not in a job: the task reports those) as the CLI's one line and exit code.
    Raised past sweep() it would reach Hydra's handler, which prints a traceback and exits 1."""
    try:
        yield
    except (UsageError, RunStopped) as e:
        exit_one_line(e)


# sqlite result codes of a disk that failed, not of a wrong or damaged file (https://sqlite.org/rescode.html)
_SQLITE_IO = {"SQLITE_FULL", "SQLITE_IOERR"}


@contextmanager
def _storage_errors(url: str):
    """The study's storage failing (SQLAlchemy's and sqlite's errors, 80-123 lines of traceback) as one line naming
    it: a disk that failed is an I/O failure (exit 74); a file that is no database, or cannot be opened, bad input."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as e:
        orig = getattr(e, "orig", None)
        words = str(orig or e).splitlines()[0]
        if getattr(orig, "sqlite_errorname", "").split("_(")[0] in _SQLITE_IO:
            raise IOFailure(f"the Optuna storage {url}: {words}") from None
        raise UsageError(f"the Optuna storage {url} cannot be used: {words} (give hydra.sweeper.storage=sqlite:///"
                         "PATH of a writable file, or leave it unset for SWEEP_DIR/optuna.db)") from None


def _dotted(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        out |= _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out
