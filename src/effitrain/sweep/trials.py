"""Optuna search, shared by the sweeper (hydra_plugins/effitrain_sweeper) and the jobs it launches: the search space
from Hydra's sweep grammar, objectives, samplers and pruners, the study's storage, and the job-side pruning hook.

A job of an Optuna sweep reports its validation loss at each evaluation to its trial in the study's storage (sqlite
in the sweep directory, so a job run by another process reaches it too) and asks the pruner whether to go on; a
pruned job stops there (optuna.TrialPruned) and is recorded as pruned, not failed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from effitrain.errors import UsageError

SWEEPER = "hydra_plugins.effitrain_sweeper.optuna_sweeper.OptunaSweeper"
# summary.json field -> the direction that is better
OBJECTIVES = {"final_val_loss": "minimize", "median_tokens_per_s": "maximize", "mem_reserved_peak_gib": "minimize",
              "median_mfu_pct": "maximize"}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "hyperband")


@dataclass
class Param:
    """One searched key: its Optuna distribution and Hydra's text of it."""

    key: str
    distribution: object  # optuna.distributions.BaseDistribution
    text: str

    def bounds(self) -> list[str]:
        """The values that bound the search: every choice, or both ends of a range or interval."""
        d = self.distribution
        if hasattr(d, "choices"):
            return [str(c) for c in d.choices]
        return [format_value(d.low), format_value(d.high)]


def format_value(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def search_space(parser, params: dict, arguments: list[str]) -> tuple[list[Param], list[str]]:
    """(searched params, fixed overrides) from hydra.sweeper.params and the command line's overrides: a sweep
    override (choice(), range(), interval(), tag(log, interval()), glob(), a,b) is searched, any other is fixed.

    Args:
        parser: Hydra's OverridesParser (with the config loader, for glob()).
    """
    from hydra.errors import HydraException

    texts = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    try:
        parsed = parser.parse_overrides(texts)
    except HydraException as e:
        raise UsageError(f"hydra.sweeper.params: {str(e).splitlines()[0]}") from None
    searched, fixed = [], []
    for o in parsed:
        if o.is_sweep_override():
            searched.append(Param(o.get_key_element(), _distribution(o), o.input_line))
        else:
            fixed.append(f"{o.get_key_element()}={o.get_value_element_as_str()}")
    keys = [p.key for p in searched]
    if len(set(keys)) != len(keys):
        raise UsageError(f"a key is searched twice: {' '.join(p.text for p in searched)}")
    return searched, fixed


def _distribution(o):
    """Hydra's sweep value -> Optuna distribution (log-scaled with tag(log, ...))."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = o.value()
    log = "log" in getattr(value, "tags", set())
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    if isinstance(value, RangeSweep) and not value.shuffle:
        values = list(o.sweep_iterator())
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step)) if values[0] <= values[-1] \
                else CategoricalDistribution([str(v) for v in values])
    if isinstance(value, (ChoiceSweep, RangeSweep)) or o.is_discrete_sweep():
        return CategoricalDistribution(list(o.sweep_string_iterator()))
    raise UsageError(f"{o.input_line}: not a search space Optuna takes (use choice(), range() or interval())")


def directions(objective) -> list[str]:
    names = [objective] if isinstance(objective, str) else list(objective)
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names:
        raise UsageError(f"hydra.sweeper.objective={unknown or names}: choose from {', '.join(OBJECTIVES)}")
    return [OBJECTIVES[n] for n in names]


def build_sampler(kind: str, *, seed, params: list[Param]):
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "grid":
        continuous = [p.text for p in params if not hasattr(p.distribution, "choices")
                      and getattr(p.distribution, "step", None) is None]
        if continuous:
            raise UsageError(f"sampler=grid needs a finite grid: {' '.join(continuous)} is an interval")
        grid = {p.key: _grid_values(p.distribution) for p in params}
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise UsageError(f"hydra.sweeper.sampler={kind!r} is not one of: {', '.join(SAMPLERS)}")


def _grid_values(d) -> list:
    if hasattr(d, "choices"):
        return list(d.choices)
    return list(range(d.low, d.high + 1, d.step))


def build_pruner(cfg):
    """The pruner hydra.sweeper.pruner names (built alike by the sweeper and each job)."""
    import optuna

    kind = cfg.kind
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_steps)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner()
    raise UsageError(f"hydra.sweeper.pruner.kind={kind!r} is not one of: {', '.join(PRUNERS)}")


def storage_url(storage, sweep_dir) -> str:
    """The study's storage: sqlite in the sweep directory unless hydra.sweeper.storage names one."""
    return storage or f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def eval_hooks(hydra_cfg) -> list:
    """For a job of a pruned Optuna sweep: one hook that reports (step, val_loss) to its trial and stops the run
    when the pruner says so. Otherwise none."""
    from hydra.types import RunMode

    sweeper = hydra_cfg.sweeper
    if hydra_cfg.mode != RunMode.MULTIRUN or sweeper.get("_target_") != SWEEPER or sweeper.pruner.kind == "none":
        return []
    import optuna

    study = optuna.load_study(study_name=sweeper.study_name, storage=storage_url(sweeper.storage,
                                                                                  hydra_cfg.sweep.dir),
                              pruner=build_pruner(sweeper.pruner))
    number = int(hydra_cfg.job.num)  # the sweeper launches trial N as job N
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    # Optuna's Trial is how a worker reports to a trial another process asked for (its id is the storage's key)
    trial = optuna.trial.Trial(study, frozen._trial_id)

    def report(step: int, val_loss: float) -> None:
        trial.report(val_loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: val_loss {val_loss:.4g}")
    return [report]


def pruned(error: BaseException) -> bool:
    optuna = sys.modules.get("optuna")  # a job that never imported it was not pruned
    return optuna is not None and isinstance(error, optuna.TrialPruned)
