"""argv -> verb (train, reproduce). Validates before anything starts; bad input is one line, exit 2.

Kept light: torch and transformers are imported only once a run really starts, so `effitrain --help`
and input errors answer at once.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from effitrain.checks import check_all
from effitrain.config import GROUPS, config_dir, group_options
from effitrain.errors import UsageError

# Hydra flags that print help: nothing is composed, so nothing needs validating first.
_HELP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}
# Hydra flags that print the composed config: it must compose, but nothing trains (paths need not exist yet).
_PRINT_FLAGS = {"--cfg", "-c", "--package", "-p", "--resolve"}
PRESETS = "experiment"  # the group of named presets (`# @package _global_`): not in the defaults list
_VERBS = {"train": "compose the config groups, launch the workers, train, write the run directory",
          "reproduce": "rerun RUN_DIR from its saved config and compare its per-step loss (exit 0 match, 1 not)"}


def main(argv: list[str] | None = None) -> int:
    from effitrain.runs import mark_launch

    mark_launch()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    try:
        if verb == "train":
            return train(rest)
        if verb == "reproduce":
            return reproduce(rest)
        raise UsageError(f"unknown verb {verb!r}; use one of: {', '.join(_VERBS)} (effitrain --help lists them)")
    except UsageError as e:
        print(f"effitrain: error: {e}", file=sys.stderr)
        return 2


def usage() -> str:
    lines = ["usage: effitrain <verb> [overrides...]", "", "verbs:"]
    lines += [f"  {verb:<10} {text}" for verb, text in _VERBS.items()]
    lines += ["", "config groups (select with group=option or +group=option):"]
    lines += [f"  {group:<12} {', '.join(group_options(group))}" for group in GROUPS]
    lines += [f"  {PRESETS:<12} {', '.join(group_options(PRESETS))}   (named presets: +experiment=NAME)"]
    lines += ["", "examples:", "  effitrain train", "  effitrain train precision=bf16 max_steps=50",
              "  effitrain train -m optimizer.lr=1e-3,3e-3 precision=fp32,bf16",
              "  effitrain reproduce outputs/<date>/<time>_run", "",
              "Hydra's grammar works unchanged: key=value, -m/--multirun, --cfg job, effitrain train --help."]
    return "\n".join(lines)


def normalize(args: list[str]) -> list[str]:
    """`+group=option` selects an option like `group=option` (the group is already in the defaults list);
    `experiment=name` becomes `+experiment=name`, since presets are not in the defaults list until chosen."""
    def one(a: str) -> str:
        key = a.lstrip("+").split("=", 1)[0] if "=" in a else None
        if key == PRESETS:
            return "+" + a.lstrip("+")
        return a[1:] if a.startswith("+") and key in GROUPS else a
    return [one(a) for a in args]


def train(args: list[str]) -> int:
    args = normalize(args)
    flags = {a for a in args if a.startswith("-")}
    if flags & {"-m", "--multirun"} and flags & _PRINT_FLAGS:
        raise UsageError("--cfg/--package print one composed config: drop -m/--multirun to use them")
    if not flags & _HELP_FLAGS:
        overrides = [a for a in args if not a.startswith("-") and a not in ("job", "hydra", "all")]
        for cfg in compose_all(overrides, multirun=bool(flags & {"-m", "--multirun"})):
            if not flags & _PRINT_FLAGS:
                check_all(cfg)
    return _run_hydra(args)


def _run_hydra(args: list[str]) -> int:
    import hydra

    from effitrain.config import register_configs

    register_configs()
    sys.argv = ["effitrain train", *args]
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_hydra_task)()
    return 0


def _hydra_task(cfg) -> dict:
    """One job (a run, or one point of a sweep), inside Hydra's run/sweep directory."""
    from hydra.core.hydra_config import HydraConfig

    from effitrain.launch import launch

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return launch(cfg, run_dir)
    except UsageError as e:  # found only once data was read: still one line, and no run directory left behind
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"effitrain: error: {e}", file=sys.stderr)
        sys.exit(2)


def compose_all(overrides: list[str], *, multirun: bool = False):
    """Compose the config of every job the overrides describe (each point of a sweep), typed and checked."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from effitrain.config import register_configs

    register_configs()
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise UsageError(_first_line(e)) from None
    axes = []
    for o in parsed:
        if o.get_key_element().startswith("hydra"):
            continue  # Hydra's own settings: Hydra checks them
        if o.is_sweep_override() and not multirun:
            raise UsageError(f"{o.input_line} is a sweep: add -m to run each value, or quote a string value")
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        if (o.key_or_group in GROUPS and o.is_add() is False or o.key_or_group == PRESETS) and not o.is_delete():
            for v in values:
                _check_option(o.key_or_group, v)
        axes.append([f"{o.get_key_element()}={v}" for v in values])
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for combo in itertools.product(*axes):
            try:
                yield compose(config_name="train", overrides=list(combo))
            except (HydraException, OmegaConfBaseException) as e:
                raise UsageError(_explain(e)) from None


def _check_option(group: str, option: str) -> None:
    options = group_options(group)
    if option not in options:
        raise UsageError(f"unknown {group} option {option!r}; choose one of: {', '.join(options)}")


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _explain(e: Exception) -> str:
    """Hydra/OmegaConf errors span lines; keep what is wrong and add what would be right."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        return f"unknown key {key!r} (effitrain train --cfg job lists every key)"
    if key:
        return f"{key}: {_first_line(Exception(getattr(cause, 'msg', None) or cause))}"
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return " ".join(line for line in lines[:2] if not line.startswith(("Set the environment", "See https")))


def reproduce(args: list[str]) -> int:
    from effitrain.reproduce import reproduce_run

    if not args or args[0].startswith("-"):
        raise UsageError("reproduce needs a run directory: effitrain reproduce outputs/<date>/<time>_<name> [--rtol X]")
    rtol = 1e-3
    if len(args) == 3 and args[1] == "--rtol":
        try:
            rtol = float(args[2])
        except ValueError:
            raise UsageError(f"--rtol takes a number, not {args[2]!r}") from None
    elif len(args) != 1:
        raise UsageError(f"unexpected arguments {' '.join(args[1:])!r}; usage: effitrain reproduce RUN_DIR [--rtol X]")
    return reproduce_run(Path(args[0]), rtol=rtol)


if __name__ == "__main__":
    sys.exit(main())
