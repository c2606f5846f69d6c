"""Everything effitrain reads from a run or sweep directory someone else may have made, under one policy: what it
reads is data, never instructions to this machine.

    RUN_DIR/.hydra/config.yaml   typed against today's schemas; no resolver is resolved (`${oc.env:...}`)
    SWEEP_DIR/multirun.yaml      only its saved command (hydra.overrides) is read, and replayed only when no override
                                 sets a Hydra callback, names a `_target_` or calls a resolver, every Hydra setting is
                                 one effitrain documents for sweeps (ALLOWED_SETTINGS), and every job it describes
                                 composes and passes the schema (compose_all: nothing is launched to find out)

What would reach beyond this machine or the directory -- a multi-node rendezvous, an Optuna storage other than a
sqlite file inside the sweep directory, the SLURM launcher, checkpoints or a token cache outside the directory --
is refused unless the user passes --allow-external (FLAG). Each refusal is one line (UsageError, exit 2).
"""

from __future__ import annotations

import re
from pathlib import Path

from effitrain.errors import UsageError
from effitrain.errors import first_line as _first_line

FLAG = "--allow-external"
_RESOLVER = re.compile(r"\$\{[^}]*:")  # `${name:...}` calls a resolver; `${key}` only refers to another key
# The Hydra settings a received sweep may replay: the sweepers and launchers effitrain documents (README "Sweeps",
# "Search: Optuna", "Launchers") and their documented keys. Every other Hydra setting is refused: several run
# code or reach out (hydra.callbacks, hydra.job.env_set, hydra.searchpath, hydra.launcher.setup/python,
# hydra/job_logging), and an allow-list does not depend on having found them all.
ALLOWED_OPTIONS = {"hydra/sweeper": ("basic", "optuna"), "hydra/launcher": ("basic", "local-parallel", "slurm")}
SWEEP_DIR_KEY = "hydra.sweep.dir"  # Hydra records it with hydra.mode=MULTIRUN; SWEEP_DIR itself replaces it
ALLOWED_SETTINGS = {
    *(f"hydra.sweeper.{k}" for k in ("max_batch_size", "n_trials", "n_jobs", "sampler", "seed", "objective",
                                     "pruner.kind", "pruner.startup_trials", "pruner.warmup_steps", "study_name",
                                     "storage")),
    *(f"hydra.launcher.{k}" for k in ("partition", "account", "timeout_min", "cpus_per_task", "mem_gb",
                                      "array_parallelism"))}
PARAMS_PREFIX = "hydra.sweeper.params."  # the search space: sweep text, composed into jobs and type-checked


def load_run_config(run_dir: Path, *, allow_external: bool = False):
    """RUN_DIR's saved config (.hydra/config.yaml), typed against today's schemas (nothing is composed anew).

    Interpolations that call a resolver (`${oc.env:...}`, `${now:...}`) are refused, not resolved, and what reaches
    beyond the run directory (check_reach) needs `allow_external` (the CLI's --allow-external). A caller that only
    reads the config (export, estimate) launches nothing and passes allow_external=True.
    """
    from effitrain.compose import typed

    saved = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory (give a run directory such as outputs/<date>/<time>_run)")
    if not saved.is_file():
        raise UsageError(f"{run_dir} has no saved config (.hydra/config.yaml); give a directory effitrain train wrote")
    raw = saved_config(saved)
    try:
        cfg = typed(raw)
    except UsageError as e:
        raise UsageError(f"{saved} does not match effitrain's config schema: {e}") from None
    check_reach(cfg, run_dir, allow_external=allow_external, where=saved)
    return cfg


def saved_config(saved: Path) -> dict:
    """A saved config file as plain data, nothing resolved; one that calls a resolver anywhere is refused."""
    raw = _read(saved)
    if not isinstance(raw, dict):
        raise UsageError(f"{saved} is not a config (a mapping of keys to values)")
    _refuse_resolvers(raw, where=saved)
    return raw


def _read(saved: Path):
    """A YAML file as plain data, nothing resolved."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as e:
        raise UsageError(f"{saved} is not a readable config: {_first_line(e)}") from None


def refuse_links(root: Path) -> None:
    """A run or sweep directory effitrain is to write into again holds only its own files: a symbolic link anywhere
    in it (`train.log -> ~/.bashrc`, `checkpoints -> another run`) is refused in one line, whatever it points at."""
    import os

    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(here) / name
            if path.is_symlink():
                raise UsageError(f"{path} is a symbolic link: effitrain writes into a run or sweep directory only "
                                 "when it holds files of its own (replace the link with the file, or copy the "
                                 "directory with cp -rL)")


def sweep_command(sweep_dir: Path, *, allow_external: bool = False) -> list[str]:
    """The arguments that made SWEEP_DIR (multirun.yaml's Hydra and task overrides), into SWEEP_DIR, once they pass
    the policy above. Composing the jobs to check them runs nothing: Hydra instantiates only the sweeper, which the
    allow-list leaves Hydra's basic one or effitrain's Optuna one."""
    from effitrain.compose import compose_all

    saved = sweep_dir / "multirun.yaml"
    if not saved.is_file():
        raise UsageError(f"{sweep_dir} is not a sweep directory (no multirun.yaml; effitrain train -m writes one)")
    refuse_links(sweep_dir)  # Hydra and the sweep write into every job directory of it
    kept = [line for line in _saved_overrides(saved) if _checked_key(line, where=saved) != SWEEP_DIR_KEY]
    command = [*kept, f"{SWEEP_DIR_KEY}={sweep_dir}"]
    for cfg in compose_all(command, multirun=True, hydra=True):
        check_reach(cfg, sweep_dir, allow_external=allow_external, where=saved)
        _check_sweep_reach(cfg.hydra, sweep_dir, allow_external=allow_external, where=saved)
    return ["-m", *command]


def check_reach(cfg, root: Path, *, allow_external: bool, where: Path) -> None:
    """What a config from `root` (a run or sweep directory) would reach beyond this machine or `root`."""
    from effitrain.data import DataBase

    if allow_external:
        return
    launcher = cfg.launcher
    if launcher.nnodes > 1 or launcher.rdzv_endpoint is not None:
        raise _refuse(where, f"asks for a multi-node rendezvous (launcher.nnodes={launcher.nnodes}, "
                      f"launcher.rdzv_endpoint={launcher.rdzv_endpoint})")
    if cfg.checkpoint.get("dir") and not _inside(cfg.checkpoint.dir, root):
        raise _refuse(where, f"keeps its checkpoints outside {root} (checkpoint.dir={cfg.checkpoint.dir})")
    cache = Path(cfg.data.cache_dir).expanduser()
    # the default cache, or one this machine's runs already built (it has their listings, or fine-tuning samples:
    # data/sft.py): effitrain writes there for any run; a directory of the sender's choosing it would create or fill
    # is another matter
    built = (cache / "listings").is_dir() or (cache / "sft").is_dir()
    if not (_inside(cache, root) or cache == Path(DataBase.cache_dir).expanduser() or built):
        raise _refuse(where, f"writes its token cache outside {root} (data.cache_dir={cfg.data.cache_dir}, not an "
                      "effitrain cache on this machine)")


def _check_sweep_reach(hydra_cfg, sweep_dir: Path, *, allow_external: bool, where: Path) -> None:
    """The composed Hydra settings of a received sweep: where its jobs run and where an Optuna study lives."""
    if allow_external:
        return
    if str(hydra_cfg.launcher.get("_target_", "")).endswith("SlurmLauncher"):
        raise _refuse(where, "submits its jobs to SLURM (hydra/launcher=slurm)")
    storage = hydra_cfg.sweeper.get("storage")
    if storage is not None and not _sqlite_inside(str(storage), sweep_dir):
        raise _refuse(where, f"keeps its Optuna study in hydra.sweeper.storage={storage!r}, not a sqlite file inside "
                      f"{sweep_dir}")


def _sqlite_inside(url: str, root: Path) -> bool:
    """`sqlite:///PATH` (PATH relative to the working directory, or absolute after a fourth slash) inside root.
    A query string could switch sqlite to URI mode and open another file, so none is taken."""
    prefix = "sqlite:///"
    return url.startswith(prefix) and "?" not in url and _inside(url[len(prefix):], root)


def _inside(path, root: Path) -> bool:
    """path (relative to the working directory, as effitrain opens it) is root or below it, symlinks followed."""
    return Path(path).expanduser().resolve().is_relative_to(Path(root).resolve())


def _refuse(where: Path, what: str) -> UsageError:
    return UsageError(f"{where} {what}; effitrain does that only with {FLAG}")


def _never(where: Path, line: str, what: str) -> UsageError:
    return UsageError(f"{where}: {line!r} {what}; a received sweep never replays that, no flag allows it (if you "
                     "trust the command, run it yourself: effitrain train -m ...)")


def _saved_overrides(saved: Path) -> list[str]:
    """hydra.overrides.hydra + hydra.overrides.task of multirun.yaml, unresolved: nothing else in it is used (the
    rest is Hydra's record of what it composed, _target_s and `${now:...}` included)."""
    raw = _read(saved)
    hydra = raw.get("hydra") if isinstance(raw, dict) else None
    overrides = hydra.get("overrides") if isinstance(hydra, dict) else None
    lists = [overrides.get(part) for part in ("hydra", "task")] if isinstance(overrides, dict) else [None]
    if not all(isinstance(x, list) and all(isinstance(o, str) for o in x) for x in lists):
        raise UsageError(f"{saved} has no saved command (hydra.overrides.hydra and .task, lists of overrides); "
                         "give a directory effitrain train -m wrote")
    return [o for x in lists for o in x]


def _checked_key(line: str, *, where: Path) -> str:
    """The key of one saved override, once it passes: parsed as Hydra parses it (a command-line flag such as
    --experimental-rerun is not an override), no _target_ or resolver anywhere in it, and a Hydra setting only from
    the allow-list. Hydra sorts overrides by key, not by the list they were saved in, so both lists get every check.
    The saved sweep directory is dropped unchecked (SWEEP_DIR replaces it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from effitrain.compose import check_options

    try:
        o = OverridesParser.create().parse_override(line)
    except HydraException:
        raise _never(where, line, "is not a Hydra override") from None
    key = o.key_or_group
    if key == SWEEP_DIR_KEY:
        return key
    if key.startswith(("hydra.callbacks", "hydra/callbacks")):
        raise _never(where, line, "sets a Hydra callback, which Hydra instantiates (runs) when the sweep starts")
    if "_target_" in line:
        raise _never(where, line, "names a _target_ (code Hydra would instantiate)")
    if _RESOLVER.search(line):
        raise _never(where, line, "calls a resolver (it would be resolved on this machine)")
    if o.package is not None:
        raise _never(where, line, "places a config at another package (@...)")
    if key.startswith(("hydra.", "hydra/")) or key == "hydra":
        _check_setting(o, line, where=where)
    elif not o.is_sweep_override():  # an option outside its group's directory (model=../../x) would make Hydra
        check_options([o])             # read a file of theirs (a sweep's options are checked per job, compose_all)
    return key


def _check_setting(o, line: str, *, where: Path) -> None:
    key = o.key_or_group
    value = None if o.is_sweep_override() else o.get_value_element_as_str()
    # a searched key becomes an override of each job: a Hydra key there would escape the allow-list
    searched = key.startswith(PARAMS_PREFIX) and not key[len(PARAMS_PREFIX):].startswith("hydra")
    if (value in ALLOWED_OPTIONS.get(key, ()) or (key == "hydra.mode" and value == "MULTIRUN")
            or key in ALLOWED_SETTINGS or searched):
        return
    raise _never(where, line, "is not a Hydra setting effitrain documents for sweeps (hydra/sweeper, hydra/launcher, "
                        "hydra.sweeper.<key>, hydra.sweeper.params.<key>, hydra.launcher.<slurm key>, hydra.sweep.dir)")


def _refuse_resolvers(node, *, where: Path, key: str = "") -> None:
    """A string calling an OmegaConf resolver (`${name:...}`) in a saved config: one line, nothing resolved."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_resolvers(v, where=where, key=f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_resolvers(v, where=where, key=f"{key}[{i}]")
    elif isinstance(node, str) and _RESOLVER.search(node):
        raise UsageError(f"{where}: {key}={node!r} calls a resolver; a saved config is data, so effitrain resolves "
                         "none (write the value itself)")
