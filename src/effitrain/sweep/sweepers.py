"""Which jobs a sweep will run, asked of the sweeper Hydra is configured with (hydra/sweeper=...), so the CLI can
check every one before anything starts.

Hydra's basic sweeper knows its jobs in advance: they are its own expansion of the overrides (glob(), range(),
sort(), choice()... as Hydra parses them, params from hydra.sweeper.params included). A search sweeper (effitrain's
Optuna sweeper) picks its jobs while it runs; it names the jobs that bound its search space instead (every choice,
both ends of every interval), so a value outside the schema is still found before the first trial.
"""

from __future__ import annotations

from effitrain.errors import UsageError

PARAMS_PREFIX = "hydra.sweeper.params."


def planned_jobs(loader, overrides: list[str]) -> list[list[str]]:
    """The task overrides of each job the configured sweeper would launch (or, for a search, its bounding jobs).

    Args:
        loader: Hydra's config loader (of an initialized GlobalHydra).
        overrides: the command line's overrides, normalized.
    """
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.plugins import Plugins
    from hydra.errors import HydraException
    from hydra.types import HydraContext, RunMode
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from effitrain.errors import explain as _explain

    try:
        base = loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
        sweeper = Plugins.instance().instantiate_sweeper(
            config=base, hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks()),
            task_function=lambda cfg: None)
        arguments = OmegaConf.to_container(base.hydra.overrides.task)
        if hasattr(sweeper, "planned_jobs"):
            return sweeper.planned_jobs(arguments)
        if isinstance(sweeper, BasicSweeper):
            # exactly BasicSweeper.sweep's expansion: its params first, then the command line's
            parsed = OverridesParser.create(config_loader=loader).parse_overrides(sweeper._parse_config() + arguments)
            return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except HydraException as e:
        if "does not support sweep type" in str(e):
            raise UsageError(f"{_explain(e)}: interval() and tag() need a search sweeper (hydra/sweeper=optuna)") \
                from None
        raise UsageError(_explain(e)) from None
    except OmegaConfBaseException as e:
        raise UsageError(_explain(e)) from None
    raise UsageError(f"effitrain cannot list the jobs of sweeper {type(sweeper).__name__} to check them; "
                     "use hydra/sweeper=basic or hydra/sweeper=optuna")


def quote_params(args: list[str]) -> list[str]:
    """`hydra.sweeper.params.KEY=choice(a,b)` on the command line: the value is the param's sweep text (a
    sweeper's params are strings, as in YAML). Hydra would read it as a sweep of its own settings, which it refuses,
    so it is quoted here (an already quoted value is left alone), and set with `++` (added, or replaced if the
    preset has it)."""
    def one(a: str) -> str:
        key, sep, value = a.partition("=")
        bare = key.lstrip("+")
        if not sep or not bare.startswith(PARAMS_PREFIX) or not value:
            return a
        if value[:1] not in ("'", '"'):
            if '"' not in value:
                value = f'"{value}"'
            elif "'" not in value:
                value = f"'{value}'"
        return f"++{bare}={value}"
    return [one(a) for a in args]
