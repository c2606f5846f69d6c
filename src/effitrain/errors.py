"""The exceptions the CLI turns into one line and an exit code: bad input (2), and a run that stopped on purpose
before its last step (preempted: 75, diverged: 1)."""


class UsageError(ValueError):
    """Bad input (config, data, layout): one clear line naming what is wrong and what would be right."""


class RunStopped(Exception):
    """The run stopped before its last step, on purpose: one line and `exit_code`, no traceback."""

    exit_code = 1


class Preempted(RunStopped):
    """SIGTERM/SIGUSR1 (SLURM's warning before it kills a job): the step finished, a checkpoint was saved.
    Exit code 75 (EX_TEMPFAIL, "try again"): a requeue script tests for it and runs `effitrain resume RUN_DIR`."""

    exit_code = 75


class Diverged(RunStopped):
    """nan_policy=abort: too many consecutive non-finite steps; the last good checkpoint is left as it was."""

    exit_code = 1


STOPS = {cls.__name__: cls for cls in (UsageError, Preempted, Diverged)}  # what a worker reports by name


def stop_report(error: Exception) -> dict:
    """What a worker process returns for a stop its launcher must re-raise (exceptions do not cross processes)."""
    return {"effitrain_stop": type(error).__name__, "message": str(error)}


def raise_reported(result) -> None:
    """Re-raise a worker's stop_report, if `result` is one."""
    if isinstance(result, dict) and "effitrain_stop" in result:
        raise STOPS[result["effitrain_stop"]](result["message"])


def first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def explain(e: Exception) -> str:
    """Hydra/OmegaConf errors span lines; keep what is wrong and add what would be right."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        return f"unknown key {key!r} (effitrain train --cfg job lists every key)"
    if key:
        return f"{key}: {first_line(Exception(getattr(cause, 'msg', None) or cause))}"
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return " ".join(line for line in lines[:2] if not line.startswith(("Set the environment", "See https")))
