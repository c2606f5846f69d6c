"""The planning verbs of the CLI: `estimate`, `plan`, `scaling-fit` (argv -> checked arguments -> module -> print).

Bad input raises UsageError (cli.main prints one line, exit 2). torch is imported only once the arguments are good.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from effitrain.errors import UsageError


def _flags(args: list[str], *, valued: set[str], switches: set[str], usage: str) -> tuple[dict, list[str]]:
    """Split `--flag value` / `--switch` from the rest; unknown flags are an error."""
    found: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in switches:
            found[a] = True
        elif a in valued:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UsageError(f"{a} needs a value; usage: {usage}")
            found[a] = args[i + 1]
            i += 1
        elif a.startswith("-"):
            raise UsageError(f"unknown option {a}; usage: {usage}")
        else:
            rest.append(a)
        i += 1
    return found, rest


def _number(flags: dict, key: str, *, kind=float, positive: bool = True):
    if key not in flags:
        return None
    try:
        value = kind(float(flags[key])) if kind is int else kind(flags[key])
    except ValueError:
        raise UsageError(f"{key} takes a number, not {flags[key]!r}") from None
    if positive and not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{key}={flags[key]} must be a positive number")
    return value


ESTIMATE_USAGE = "effitrain estimate [train overrides...] [--mfu X] [--gpu NAME] [--json] [--max-batch [GIB]]"


def estimate(args: list[str]) -> int:
    """`effitrain estimate`: the same overrides as train, checked the same way; nothing is built but shapes."""
    max_batch_free = None
    if "--max-batch" in args:  # an optional value: a number after it is the memory to fit in
        i = args.index("--max-batch")
        nxt = args[i + 1] if i + 1 < len(args) else None
        if nxt is not None and _is_number(nxt):
            max_batch_free = float(nxt)
            args = args[:i] + args[i + 2:]
        else:
            max_batch_free = -1.0  # the device's free memory
            args = args[:i] + args[i + 1:]
    flags, overrides = _flags(args, valued={"--mfu", "--gpu"}, switches={"--json"}, usage=ESTIMATE_USAGE)
    mfu = _number(flags, "--mfu")
    if mfu is not None and mfu > 1:
        raise UsageError(f"--mfu {mfu:g} is a fraction of peak: give 0 < X <= 1 (e.g. 0.4)")
    if "--gpu" in flags:
        _known_gpu(flags["--gpu"])
    from effitrain.checks import check_all
    from effitrain.compose import compose_one, normalize

    if any(o in ("-m", "--multirun") for o in overrides):
        raise UsageError("estimate takes one config: drop -m and give single values")
    cfg = compose_one(normalize(overrides))
    check_all(cfg)
    from effitrain import estimate as est_mod
    from effitrain.data import run_data_config

    gpu = flags.get("--gpu")
    est = est_mod.estimate(cfg, mfu=mfu, gpu=gpu.lower() if gpu else None)
    extra = {}
    if max_batch_free is not None:
        free = _free_bytes() if max_batch_free < 0 else int(max_batch_free * est_mod.GiB)
        shape = est_mod.model_shape(cfg.model, vocab=est_mod.vocab_size(run_data_config(cfg)),
                                    seq_len=cfg.data.seq_len, compression=cfg.compression)
        extra = {"max_batch": est_mod.max_batch(cfg, free_bytes=free, shape=shape), "max_batch_free_bytes": free}
    if "--json" in flags:
        print(json.dumps(est.as_dict() | extra, indent=2))
    else:
        print(est_mod.format_table(est))
        if extra:
            print(f"largest batch_size that fits in {extra['max_batch_free_bytes'] / est_mod.GiB:.2f} GiB per rank: "
                  f"{extra['max_batch']}")
    return 0


# the names of flops.PEAK_FLOPS, checked without importing torch
KNOWN_GPUS = ("H200", "H100", "H100 PCIe", "H100 NVL", "A100", "L4", "V100")


def _known_gpu(name: str) -> None:
    if name.upper() not in KNOWN_GPUS:
        raise UsageError(f"--gpu {name}: no datasheet peak for it; known: {', '.join(g.lower() for g in KNOWN_GPUS)}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _free_bytes() -> int:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--max-batch without a size reads the GPU's free memory, and there is no GPU here: "
                         "give the memory per rank, e.g. --max-batch 80 (GiB)")
    return torch.cuda.mem_get_info()[0]


PLAN_USAGE = ("effitrain plan (--flops C | --gpus N --gpu NAME --hours H [--mfu 0.4]) [--fit approach1|approach3] "
              "[--inference-tokens T [--serve-cost FILE.json]] [--seq-len S] [--vocab V] [--json]")


def plan(args: list[str]) -> int:
    from effitrain.commands import plan as plan_mod
    flags, rest = _flags(args, valued={"--flops", "--gpus", "--gpu", "--hours", "--mfu", "--fit", "--inference-tokens",
                                       "--seq-len", "--vocab", "--serve-cost"}, switches={"--json"}, usage=PLAN_USAGE)
    if rest:
        raise UsageError(f"unexpected arguments {' '.join(rest)!r}; usage: {PLAN_USAGE}")
    fit = flags.get("--fit", "approach1")
    if fit not in plan_mod.FITS:
        raise UsageError(f"--fit {fit!r} is not one of: {', '.join(plan_mod.FITS)}")
    mfu = _number(flags, "--mfu") or 0.4
    if mfu > 1:
        raise UsageError(f"--mfu {mfu:g} is a fraction of peak: give 0 < X <= 1")
    gpus = _number(flags, "--gpus", kind=int)
    if "--gpu" in flags:
        _known_gpu(flags["--gpu"])
    c, source = plan_mod.budget_flops(flops=_number(flags, "--flops"), gpus=gpus, gpu=flags.get("--gpu"),
                                      hours=_number(flags, "--hours"), mfu=mfu)
    inference = _number(flags, "--inference-tokens", positive=False)
    if inference is not None and inference < 0:
        raise UsageError("--inference-tokens must be >= 0")
    serving = plan_mod.serving_basis(_serve_cost(flags, inference), mfu=mfu)
    p = plan_mod.make_plan(c=c, source=source, fit=fit, vocab=_number(flags, "--vocab", kind=int) or 32768,
                           seq_len=_number(flags, "--seq-len", kind=int) or 2048, gpus=gpus or 1,
                           inference_tokens=inference, serving=serving)
    print(json.dumps(p.as_dict(), indent=2) if "--json" in flags else plan_mod.format_plan(p))
    return 0


def _serve_cost(flags: dict, inference: float | None) -> dict | None:
    """The `effitrain serve-cost --out` JSON --serve-cost names (its first model's serving MFU), or None."""
    if "--serve-cost" not in flags:
        return None
    if inference is None:
        raise UsageError("--serve-cost prices inference tokens: give --inference-tokens T with it")
    from effitrain.runs import read_json

    path = Path(flags["--serve-cost"])
    data = read_json(path)
    if data is None:
        raise UsageError(f"--serve-cost {path}: no such file (write one with effitrain serve-cost MODEL --out FILE)")
    models = data.get("models") if isinstance(data, dict) else None
    if not models or not all(isinstance(m, dict) and (m.get("serve_mfu") or 0) > 0 for m in models):
        raise UsageError(f"--serve-cost {path}: not a serve-cost --out file with a serving MFU per model")
    return data


FIT_USAGE = "effitrain scaling-fit SWEEP_DIR [--check RUN_DIR] [--params non-embedding|total] [--png PATH] [--json]"


def scaling_fit(args: list[str]) -> int:
    flags, rest = _flags(args, valued={"--check", "--params", "--png"}, switches={"--json"}, usage=FIT_USAGE)
    if len(rest) != 1:
        raise UsageError(f"scaling-fit takes one sweep directory; usage: {FIT_USAGE}")
    params = flags.get("--params", "non-embedding")
    if params not in ("non-embedding", "total"):
        raise UsageError(f"--params {params!r} is not one of: non-embedding, total")
    check = Path(flags["--check"]) if "--check" in flags else None
    if check is not None and not check.is_dir():
        raise UsageError(f"--check {check}: not a directory (give a run directory)")
    from effitrain.commands.scaling import format_fit
    from effitrain.commands.scaling import scaling_fit as fit

    result = fit(Path(rest[0]), params=params, check=check, png=Path(flags["--png"]) if "--png" in flags else None)
    print(json.dumps(result.__dict__, indent=2) if "--json" in flags else format_fit(result))
    return 0
