"""argv -> verb (train, reproduce). Validates before anything starts; bad input is one line, exit 2 (here, and in
the torchrun entry train.main, which has no CLI above it).

Kept light: torch and transformers are imported only once a run really starts, so `effitrain --help`
and input errors answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from effitrain.compose import GROUP_NAMES, PRESETS, compose_all, config_dir, group_options, normalize
from effitrain.errors import UsageError

# Hydra flags that print help: nothing is composed, so nothing needs validating first.
_HELP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}
# Hydra flags that print the composed config: it must compose, but nothing trains (paths need not exist yet).
_PRINT_FLAGS = {"--cfg", "-c", "--package", "-p", "--resolve"}
_VERBS = {"train": "compose the config groups, launch the workers, train, write the run directory",
          "reproduce": "rerun RUN_DIR from its saved config and compare its per-step loss (exit 0 match, 1 not)",
          "eval": "validation loss, perplexity, bits per byte and eval.tasks accuracy of HF_DIR on a data option"}


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
        if verb == "eval":
            from effitrain.evaluate import eval_command

            return eval_command(rest)
        raise UsageError(f"unknown verb {verb!r}; use one of: {', '.join(_VERBS)} (effitrain --help lists them)")
    except UsageError as e:
        print(f"effitrain: error: {e}", file=sys.stderr)
        return 2


def usage() -> str:
    lines = ["usage: effitrain <verb> [overrides...]", "", "verbs:"]
    lines += [f"  {verb:<10} {text}" for verb, text in _VERBS.items()]
    lines += ["", "config groups (select with group=option or +group=option):"]
    lines += [f"  {group:<12} {', '.join(group_options(group))}" for group in GROUP_NAMES]
    lines += [f"  {PRESETS:<12} {', '.join(group_options(PRESETS))}   (named presets: +experiment=NAME)"]
    lines += ["", "examples:", "  effitrain train", "  effitrain train precision=bf16 max_steps=50",
              "  effitrain train -m optimizer.lr=1e-3,3e-3 precision=fp32,bf16",
              "  effitrain reproduce outputs/<date>/<time>_run",
              "  effitrain eval HF_DIR data=text data.paths=[docs/] eval.tasks=[next-line]", "",
              "Hydra's grammar works unchanged: key=value, -m/--multirun, --cfg job, effitrain train --help."]
    return "\n".join(lines)


def train(args: list[str]) -> int:
    args = normalize(args)
    flags = {a for a in args if a.startswith("-")}
    if flags & {"-m", "--multirun"} and flags & _PRINT_FLAGS:
        raise UsageError("--cfg/--package print one composed config: drop -m/--multirun to use them")
    if not flags & _HELP_FLAGS:
        from effitrain.checks import check_all

        overrides = [a for a in args if not a.startswith("-") and a not in ("job", "hydra", "all")]
        for cfg in compose_all(overrides, multirun=bool(flags & {"-m", "--multirun"})):
            if not flags & _PRINT_FLAGS:
                check_all(cfg)
    return _run_hydra(args)


def _run_hydra(args: list[str]) -> int:
    import hydra

    from effitrain.compose import register_configs

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
