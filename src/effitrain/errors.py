"""The exceptions the CLI turns into one line and an exit code: bad input (2), a run that stopped on purpose before
its last step (preempted: 75, diverged: 1, interrupted twice: 130), and an I/O failure (74: disk full, a file that
cannot be written) -- never mistaken for bad input."""

from __future__ import annotations

import errno


class UsageError(ValueError):
    """Bad input (config, data, layout): one clear line naming what is wrong and what would be right."""


class RunStopped(Exception):
    """The run stopped before its last step, on purpose: one line and `exit_code`, no traceback."""

    exit_code = 1


class Preempted(RunStopped):
    """SIGTERM/SIGUSR1 (SLURM's warning before it kills a job) or a first Ctrl-C: the step finished, a checkpoint was
    saved. Exit code 75 (EX_TEMPFAIL, "try again"): a requeue script tests for it and runs
    `effitrain resume RUN_DIR`."""

    exit_code = 75


class Diverged(RunStopped):
    """nan_policy=abort: too many consecutive non-finite steps; the last good checkpoint is left as it was."""

    exit_code = 1


class Interrupted(RunStopped):
    """A second Ctrl-C: stopped at once, without saving (the latest complete checkpoint stays resumable). 130 is the
    shell's code for a process ended by SIGINT."""

    exit_code = 130


class IOFailure(RunStopped):
    """The disk is full, or a file could not be written or read back: not bad input, so not exit 2. Exit code 74
    (EX_IOERR); what was complete before stays."""

    exit_code = 74


STOPS = {cls.__name__: cls for cls in (UsageError, RunStopped, Preempted, Diverged, Interrupted, IOFailure)}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def io_failure(error: OSError, path=None, *, doing: str = "") -> IOFailure:
    """An OSError as one IOFailure line: "disk full at PATH" for ENOSPC/EDQUOT/EFBIG, else the OS's own words."""
    where = path if path is not None else getattr(error, "filename", None) or "?"
    if getattr(error, "errno", None) in _FULL:
        what = f"disk full at {where} ([Errno {error.errno}] {error.strerror})"
    else:
        what = f"{where}: {error.strerror or first_line(error)}"
    return IOFailure(f"{doing}: {what}" if doing else what)


def as_io_failure(error: BaseException) -> BaseException:
    """An OSError of the disk or the file system (full, read-only, an I/O error, no permission) as an IOFailure
    line; any other exception as it is."""
    io = {*_FULL, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOTDIR, errno.EISDIR}
    if isinstance(error, OSError) and getattr(error, "errno", None) in io:
        return io_failure(error)
    return error


def exit_one_line(error: UsageError | RunStopped):
    """Print a stop's one line to stderr (bad input as "error: ...") and exit with its code: for the places below the
    CLI's own handler (Hydra's task and sweeper, the torchrun entry), where an exception would become a traceback."""
    import sys

    if isinstance(error, UsageError):
        print(f"effitrain: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"effitrain: {error}", file=sys.stderr)
    sys.exit(error.exit_code)


def stop_report(error: Exception) -> dict:
    """What a worker process returns for a stop its launcher must re-raise (exceptions do not cross processes): the
    nearest class the launcher knows (a ModelError is a UsageError there), with the worker's own message."""
    known = next(cls for cls in type(error).__mro__ if cls.__name__ in STOPS and STOPS[cls.__name__] is cls)
    return {"effitrain_stop": known.__name__, "message": str(error), "exit_code": getattr(error, "exit_code", 2)}


def raise_reported(result) -> None:
    """Re-raise a worker's stop_report, if `result` is one."""
    if isinstance(result, dict) and "effitrain_stop" in result:
        error = STOPS.get(result["effitrain_stop"], RunStopped)(result["message"])
        if isinstance(error, RunStopped):
            error.exit_code = result.get("exit_code", error.exit_code)
        raise error


def first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


# keys users look for that effitrain does not have, and why (still unknown keys, in one line that says so)
NOT_BUILT = {"parallel.cp": "context parallelism is not built: torch's ring attention (context_parallel) is "
                            "CUDA-only, and no test could run it here; for long sequences use parallel.tp with "
                            "parallel.sequence_parallel=true"}


def unknown_key(key: str) -> str:
    """The line for a key no schema has: what is not built, or where every key is listed."""
    if key in NOT_BUILT:
        return f"unknown key {key!r}: {NOT_BUILT[key]}"
    return f"unknown key {key!r} (effitrain train --cfg job lists every key)"


def explain(e: Exception) -> str:
    """Hydra/OmegaConf errors span lines; keep what is wrong and add what would be right."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        return unknown_key(key)
    if key:
        return f"{key}: {first_line(Exception(getattr(cause, 'msg', None) or cause))}"
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return " ".join(line for line in lines[:2] if not line.startswith(("Set the environment", "See https")))
