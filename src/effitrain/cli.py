"""argv -> verb (train, resume, reproduce, export, sample, compare). Validates before anything starts; bad input
is one line, exit 2 (here, and in the torchrun entry train.main, which has no CLI above it).

Kept light: torch and transformers are imported only once a run really starts, so `effitrain --help`
and input errors answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from effitrain.compose import GROUP_NAMES, PRESETS, compose_all, config_dir, group_options, normalize
from effitrain.errors import Interrupted, IOFailure, RunStopped, UsageError, as_io_failure
from effitrain.rundir import claim_for_hydra, release_claims

# Hydra flags that print help: nothing is composed, so nothing needs validating first.
_HELP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}
# Hydra flags that print the composed config: it must compose, but nothing trains (paths need not exist yet).
_PRINT_FLAGS = {"--cfg", "-c", "--package", "-p", "--resolve"}
_VERBS = {"train": "compose the config groups, launch the workers, train, write the run directory",
          "resume": "continue RUN_DIR in place from its latest checkpoint [key=value...] (e.g. max_steps=500), or the "
                    "unfinished jobs of SWEEP_DIR [--allow-external: what a received directory reaches beyond it]",
          "reproduce": "rerun RUN_DIR from its saved config, compare every step (exit 0 identical, 3 within "
                       "tolerance, 1 diverged) [--rtol X] [--exact] [--from-step K]",
          "export": "write a Hugging Face model directory from a checkpoint [--step N] [--out DIR] [--dtype fp32|bf16] "
                    "[--quantize int8|int4]",
          "sample": "print a continuation of PROMPT by RUN_DIR's (or an HF directory's) model [--tokens N] "
                    "[--temperature T]",
          "compare": "RUN_DIR... | SWEEP_DIR: table of what differs and the metrics, plots into compare/ [--out DIR]",
          "estimate": "memory per rank, FLOPs and time of train's overrides, before running [--mfu X] [--gpu NAME] "
                      "[--json] [--max-batch GIB]",
          "plan": "compute-optimal size and tokens for --flops C or --gpus N --gpu NAME --hours H (Chinchilla)",
          "scaling-fit": "fit L(N) = E + A/N^alpha to a sweep over model sizes, predict the next, plot it",
          "serve-cost": "what MODEL... (HF dirs, run dirs) cost to serve: time to first token, decode tokens/s, "
                        "latency p50/p95, weights and KV-cache memory, bytes on disk [--batch 1,4] [--prompt N] "
                        "[--gen N] [--dtype fp32|bf16] [--quant none|int8|int4] [--compile off|on|both] [--json] "
                        "[--price-per-hour P] [--out FILE.json] [--plot FILE.png]",
          "eval": "validation loss, perplexity, bits per byte and eval.tasks accuracy of HF_DIR or RUN_DIR on a data "
                  "option"}


def main(argv: list[str] | None = None) -> int:
    from effitrain.logging import quiet_import_noise
    from effitrain.runs import mark_launch

    mark_launch()
    quiet_import_noise()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    failed = True  # what this command claimed is undone unless it ends in a result (0, 1, 3) or a stop (75)
    try:
        if verb == "train":
            code = train(rest)
        elif verb in _HANDLERS:
            code = _HANDLERS[verb](rest)
        else:
            raise UsageError(f"unknown verb {verb!r}; use one of: {', '.join(_VERBS)} (effitrain --help lists them)")
        failed = False
        return code
    except UsageError as e:
        print(f"effitrain: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # preempted (75), diverged (1), interrupted (130), I/O (74): one line, no traceback
        failed = isinstance(e, (Interrupted, IOFailure))
        print(f"effitrain: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the disk or the file system (full, read-only): its own code, not bad input
        failure = as_io_failure(e)
        if failure is e:
            raise
        print(f"effitrain: {failure}", file=sys.stderr)
        return failure.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (composing, loading data): nothing to save
        print("effitrain: interrupted (Ctrl-C)", file=sys.stderr)
        return Interrupted.exit_code
    except SystemExit as e:  # an exit from inside Hydra (the task's, the sweeper's): a result or a stop keeps all
        failed = e.code not in (None, 0, 1, 3, 75)
        raise e
    finally:
        release_claims(undo=failed)


def usage() -> str:
    lines = ["usage: effitrain <verb> [overrides...]", "", "verbs:"]
    lines += [f"  {verb:<12} {text}" for verb, text in _VERBS.items()]
    lines += ["", "config groups (select with group=option or +group=option):"]
    lines += [f"  {group:<12} {', '.join(group_options(group))}" for group in GROUP_NAMES]
    lines += [f"  {PRESETS:<12} {', '.join(group_options(PRESETS))}   (named presets: +experiment=NAME)"]
    lines += ["", "examples:", "  effitrain train", "  effitrain train precision=bf16 max_steps=50",
              "  effitrain train -m optimizer.lr=1e-3,3e-3 precision=fp32,bf16",
              "  effitrain train -m 'schedule=glob(c*)' 'seed=range(1,4)'",
              "  effitrain train -m hydra/sweeper=optuna 'optimizer.lr=tag(log,interval(1e-4,1e-2))'",
              "  effitrain compare outputs/multirun/<date>/<time>_run",
              "  effitrain resume outputs/<date>/<time>_run max_steps=240",
              "  effitrain reproduce outputs/<date>/<time>_run --from-step 80",
              "  effitrain export outputs/<date>/<time>_run --out model/ && effitrain sample model/ 'def '",
              "  effitrain estimate model=llama-1b precision=bf16 batch_size=8 --gpu h100",
              "  effitrain eval HF_DIR data=text data.paths=[docs/] eval.tasks=[next-line]",
              "  effitrain plan --gpus 8 --gpu h100 --hours 24 --inference-tokens 1e12", "",
              "Hydra's grammar works unchanged: key=value, -m/--multirun, --cfg job, effitrain train --help."]
    return "\n".join(lines)


def train(args: list[str], *, allow_external: bool = False) -> int:
    from effitrain.commands.sweep import RESUME_KEY, resume_arguments, resuming
    from effitrain.received import FLAG

    if FLAG in args:  # the one flag of train's own: it is about the sweep directory sweep.resume= reads
        if not any(a.startswith(RESUME_KEY) for a in args):
            raise UsageError(f"{FLAG} allows what a directory someone else made asks for: give it with "
                             "sweep.resume=SWEEP_DIR (or effitrain resume DIR); your own overrides need no flag")
        args, allow_external = [a for a in args if a != FLAG], True
    args = resume_arguments(normalize(args), allow_external=allow_external)
    flags = {a for a in args if a.startswith("-")}
    if flags & {"-m", "--multirun"} and flags & _PRINT_FLAGS:
        raise UsageError("--cfg/--package print one composed config: drop -m/--multirun to use them")
    if not flags & _HELP_FLAGS:
        from effitrain.checks import check_all
        from effitrain.estimate import fit_check

        overrides = [a for a in args if not a.startswith("-") and a not in ("job", "hydra", "all")]
        multirun = bool(flags & {"-m", "--multirun"})
        first = None
        for cfg in compose_all(overrides, multirun=multirun, hydra=True):
            first = first or cfg
            if not flags & _PRINT_FLAGS:
                check_all(cfg)
                fit_check(cfg)  # CUDA only: the memory estimate against the GPU's free memory
        if not flags & _PRINT_FLAGS:  # checked: now the directory, before Hydra writes anything into it
            args = claim_for_hydra(first, args, multirun=multirun, resuming=resuming())
    return _run_hydra(args)


def _run_hydra(args: list[str]) -> int:
    import hydra

    from effitrain.commands import sweep
    from effitrain.compose import register_configs

    register_configs()
    sys.argv = ["effitrain train", *args]
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_hydra_task)()
    # a sweep with failed jobs exits 1, as a failed run does (a count would collide with 2, bad input, and 75);
    # how many failed is in its summary line and summary.json
    return 1 if sweep.last_sweep.get("failed", 0) else 0


def _hydra_task(cfg) -> dict:
    """One job (a run, or one point of a sweep), inside Hydra's run/sweep directory. In a sweep, a job that fails
    is a result: recorded as failed with its reason (or as pruned, when a search stopped it), and the sweep goes
    on; a resumed sweep skips the jobs that finished."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from effitrain.checkpoint.layout import default_root
    from effitrain.commands.sweep import finished_before, one_line, record_outcome, resuming
    from effitrain.engine.train import launch
    from effitrain.errors import Diverged, Preempted, as_io_failure, exit_one_line
    from effitrain.rundir import claim_of
    from effitrain.sweep.trials import eval_hooks, pruned

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if sweeping and (summary := finished_before(run_dir)) is not None:
        return summary
    claim = None
    try:
        # a sweep's job directory is claimed here (a single run's was claimed by the CLI before Hydra started)
        claim = claim_of(run_dir, continuing=sweeping and resuming(),
                         checkpoints=default_root(run_dir, cfg.checkpoint.get("dir")))
        return launch(cfg, run_dir, resume=sweeping and resuming(), on_eval=eval_hooks(hydra_cfg))
    except (Exception, KeyboardInterrupt) as e:
        e = as_io_failure(e)
        if sweeping and claim is not None and not isinstance(e, (Preempted, Interrupted, KeyboardInterrupt)):
            status = "pruned" if pruned(e) else "failed"  # a job's failure is a result; the others stop the sweep
            record_outcome(run_dir, status, one_line(e))
            print(f"effitrain: job {hydra_cfg.job.num} {status}: {one_line(e)}", file=sys.stderr)
            return {"status": status, "reason": one_line(e)}
        if claim is not None and not sweeping and not isinstance(e, (Preempted, Diverged)):
            claim.undo()  # only what this invocation made; a run with a complete checkpoint stays whole (resumable)
        if sweeping and isinstance(e, (Preempted, Interrupted)):  # the sweep is what the user continues
            e = type(e)(f"{e} -- the sweep stopped: effitrain resume {hydra_cfg.sweep.dir} continues it")
        if isinstance(e, (UsageError, RunStopped)):  # bad input found only once data was read: still one line
            exit_one_line(e)
        if isinstance(e, KeyboardInterrupt):
            print("effitrain: interrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(Interrupted.exit_code)
        raise
    finally:
        if claim is not None:
            claim.settled = True  # kept (a result, a stop) or undone above: the CLI's own cleanup leaves it be
            claim.release()


def _parse(args: list[str], *, usage: str, positional: int, flags: dict[str, type]) -> tuple[list[str], dict]:
    """`positional` leading arguments (then any key=value for resume), and --flag VALUE / --switch options."""
    values, rest, i = {}, [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name = a[2:].replace("-", "_")
            if name not in flags:
                raise UsageError(f"unknown option {a}; usage: {usage}")
            if flags[name] is bool:
                values[name], i = True, i + 1
                continue
            if i + 1 >= len(args):
                raise UsageError(f"{a} needs a value; usage: {usage}")
            try:
                values[name] = flags[name](args[i + 1])
            except ValueError:
                kind = {int: "an integer", float: "a number"}.get(flags[name], "a value")
                raise UsageError(f"{a} takes {kind}, not {args[i + 1]!r}") from None
            i += 2
        else:
            rest.append(a)
            i += 1
    if len(rest) < positional:
        raise UsageError(f"usage: {usage}")
    return rest, values


def resume(args: list[str]) -> int:
    from effitrain.commands.resume import resume_run

    usage = "effitrain resume RUN_DIR [key=value...] [--allow-external] | SWEEP_DIR [--allow-external]"
    if not args or args[0].startswith("-"):
        raise UsageError(f"resume needs a run directory; usage: {usage}")
    rest, opts = _parse(args, usage=usage, positional=1, flags={"allow_external": bool})
    if (Path(rest[0]) / "multirun.yaml").is_file():  # a sweep: its own command again, finished jobs skipped
        if len(rest) > 1:
            raise UsageError(f"effitrain resume SWEEP_DIR reruns the sweep's own command; drop {' '.join(rest[1:])}")
        return train([f"sweep.resume={rest[0]}"], **opts)
    return resume_run(Path(rest[0]), rest[1:], **opts)


def reproduce(args: list[str]) -> int:
    from effitrain.commands.reproduce import reproduce_run

    usage = "effitrain reproduce RUN_DIR [--rtol X] [--exact] [--from-step K] [--allow-external]"
    if not args or args[0].startswith("-"):
        raise UsageError(f"reproduce needs a run directory: {usage}")
    rest, opts = _parse(args, usage=usage, positional=1,
                        flags={"rtol": float, "exact": bool, "from_step": int, "allow_external": bool})
    if len(rest) != 1:
        raise UsageError(f"unexpected arguments {' '.join(rest[1:])!r}; usage: {usage}")
    return reproduce_run(Path(rest[0]), rtol=opts.pop("rtol", 1e-3), **opts)


def export(args: list[str]) -> int:
    from effitrain.engine.export import DEFAULT_SHARD_SIZE, export_run

    usage = ("effitrain export RUN_DIR [--step N] [--out DIR] [--dtype fp32|bf16] [--quantize int8|int4] "
             "[--max-shard-size 5GB]")
    rest, opts = _parse(args, usage=usage, positional=1,
                        flags={"step": int, "out": str, "dtype": str, "quantize": str, "max_shard_size": str})
    if len(rest) != 1:
        raise UsageError(f"usage: {usage}")
    out = export_run(Path(rest[0]), step=opts.get("step"), out=Path(opts["out"]) if "out" in opts else None,
                     dtype=opts.get("dtype", "fp32"), quantize=opts.get("quantize"),
                     max_shard_size=opts.get("max_shard_size", DEFAULT_SHARD_SIZE))
    print(out)
    return 0


def sample(args: list[str]) -> int:
    from effitrain.engine.export import sample_text

    usage = "effitrain sample RUN_DIR|HF_DIR (PROMPT | --chat MESSAGE) [--tokens N] [--temperature T] [--seed S]"
    rest, opts = _parse(args, usage=usage, positional=1,
                        flags={"tokens": int, "temperature": float, "seed": int, "chat": str})
    message = opts.pop("chat", None)
    if len(rest) != (1 if message is not None else 2):
        raise UsageError(f"usage: {usage} (quote the prompt)")
    print(sample_text(Path(rest[0]), message if message is not None else rest[1], chat=message is not None, **opts))
    return 0


def compare(args: list[str]) -> int:
    from effitrain.commands.compare import compare_main

    return compare_main(args)


def _planning(verb: str):
    """estimate, plan, scaling-fit: their argument parsing lives in commands/planning.py (imported when used)."""
    def run(args: list[str]) -> int:
        from effitrain.commands import planning
        return {"estimate": planning.estimate, "plan": planning.plan, "scaling-fit": planning.scaling_fit}[verb](args)
    return run


def evaluate(args: list[str]) -> int:
    from effitrain.commands.evaluate import eval_command

    return eval_command(args)


def serve_cost(args: list[str]) -> int:
    from effitrain.commands.serve_cost import serve_cost_main

    return serve_cost_main(args)


_HANDLERS = {"train": train, "resume": resume, "reproduce": reproduce, "export": export, "sample": sample,
             "compare": compare, "eval": evaluate,
             "serve-cost": serve_cost,
             **{verb: _planning(verb) for verb in ("estimate", "plan", "scaling-fit")}}


if __name__ == "__main__":
    sys.exit(main())
