"""Checks of a composed config, run before any process starts (no torch): the top-level keys, each group's own
checks and each chosen option's checks against the run (both in the group's package), then the one rule that spans
groups: what each chosen option needs, another provides (`check_traits`, reading the traits every option declares).

Each check raises UsageError with one line: what is wrong and what would be right.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from effitrain.compose import GROUPS
from effitrain.errors import UsageError
from effitrain.precision import CUDA
from effitrain.registry import Traits


def check_all(cfg) -> None:
    check_run(cfg)
    for group in GROUPS:
        group.check(cfg[group.name])
    # options that cannot run together first: that holds whatever values the run sets, which the options' own
    # checks would otherwise have the user fix in vain
    check_traits(cfg, which=("excludes",))
    for group in GROUPS:
        group.check_options(cfg)
    check_traits(cfg, which=("needs",))


def check_traits(cfg, *, which: tuple[str, ...] = ("excludes", "needs")) -> None:
    """The one rule across groups: each chosen option's needs are provided by another chosen option (or the run's
    device), and nothing it excludes is; the line comes from the option's Need (registry.Traits).

    Args:
        which: the declarations to check: "excludes" (which options cannot run together), "needs".
    """
    chosen = [(group, node) for group in GROUPS for node in group.nodes(cfg[group.name]).values()]
    provided: dict[str, list[tuple]] = {CUDA: [("device", None)]} if _has_gpu(cfg.device) else {}
    for group, node in chosen:
        for trait in _traits(group, node).of("provides", node, cfg):
            provided.setdefault(trait, []).append((group, node))
    for group, node in chosen:
        for need in _traits(group, node).of("excludes", node, cfg) if "excludes" in which else ():
            others = [(g, n) for g, n in provided.get(need.trait, []) if n is not node]
            if others:
                raise UsageError(f"{_pair((group, node), others[0])} cannot run together: {need.why}")
    for group, node in chosen:
        for need in _traits(group, node).of("needs", node, cfg) if "needs" in which else ():
            _need(need.trait in provided, _unmet(group, node, need, cfg))


def _traits(group, node) -> Traits:
    return group.traits_of(group.kind_of(node)) or Traits()


def _label(group, node) -> str:
    return f"{group.name}={node.name}"


def _pair(a: tuple, b: tuple) -> str:
    """Two options named as a user would write them: `compression=a and b`, or `compression=a and precision=b`."""
    (ga, na), (gb, nb) = sorted((a, b), key=lambda o: _label(*o))
    return f"{_label(ga, na)} and {nb.name if ga is gb else _label(gb, nb)}"


def _unmet(group, node, need, cfg) -> str:
    """The line for a need nothing chosen provides: the options of one group that would, when there are such."""
    providers = {g.name: [k for k in g.schemas if need.trait in _static_provides(g, k)] for g in GROUPS}
    providers = {name: kinds for name, kinds in providers.items() if kinds}
    if len(providers) == 1:
        (name, kinds), = providers.items()
        return (f"{_label(group, node)} runs under {name}={' or '.join(kinds)}, not {_chosen(name, cfg, kinds)}: "
                f"{need.why}")
    if need.trait == CUDA:
        return (f"{_label(group, node)} {need.why}; device={cfg.device} "
                f"{'is the CPU' if cfg.device == 'cpu' else 'finds no NVIDIA GPU'}")
    return f"{_label(group, node)} {need.why}"


def _chosen(name: str, cfg, kinds: list[str]) -> str:
    """The chosen option of group `name`; when it is one of the `kinds` that would provide the trait, with the setting
    that took it away (a value-dependent list's `unless`: parallel=ddp with parallel.ep=2 has no whole weights)."""
    g = next(g for g in GROUPS if g.name == name)
    node = cfg[name]
    providing = not g.multi and g.kind_of(node) in kinds
    unless = getattr(_traits(g, node).provides, "unless", None) if providing else None
    return f"{node.name} with {unless(node)}" if unless is not None and unless(node) else node.name


def _static_provides(group, kind: str) -> tuple:
    traits = group.traits_of(kind)
    if traits is None:
        return ()
    # a value-dependent list names what it provides by default as `static` (parallel's traits under parallel.ep)
    return tuple(getattr(traits.provides, "static", ())) if callable(traits.provides) else tuple(traits.provides)


def _has_gpu(device: str) -> bool:
    """Whether the run's device is an NVIDIA GPU: device=cuda, or auto where a driver is present (the capability
    check needs torch: the worker makes it at start)."""
    return device == "cuda" or (device == "auto" and Path("/proc/driver/nvidia/version").exists())


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def check_run(cfg) -> None:
    for key in ("max_steps", "batch_size", "grad_accum_steps", "eval_every", "eval_batches"):
        _need(cfg[key] > 0, f"{key}={cfg[key]} must be a positive integer")
    _need(cfg.grad_clip >= 0, f"grad_clip={cfg.grad_clip} must be >= 0 (0 measures the norm without clipping)")
    _need(cfg.nan_policy in ("abort", "skip"), f"nan_policy={cfg.nan_policy!r} is not one of: abort, skip")
    _need(cfg.nan_patience > 0, f"nan_patience={cfg.nan_patience} must be a positive integer")
    _need(cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r} is not one of: auto, cpu, cuda")
    _need(cfg.eval.task_items > 0, f"eval.task_items={cfg.eval.task_items} must be a positive integer")
    check_names(cfg)
    from effitrain.eval.tasks import check_specs

    check_specs(list(cfg.eval.tasks))


def check_names(cfg) -> None:
    """Strings that become part of a path or of a line in a run's files. `name` ends the run (and sweep) directory's
    name (hydra.run.dir) and starts its log: a path separator would put the run in another directory, a newline
    would forge a log line, a NUL no file system takes. Each option's name is in that log line; an eval task file's
    stem names its metric (data.sources names are checked with the mix, data.source_configs)."""
    name = cfg.name
    _need(name not in ("", ".", "..") and not any(c in "/\\" for c in name) and _one_line(name),
          f"name={name!r} names the run directory and its log lines: use a name without a path separator (/ or \\), "
          "newline or other control character (and not empty, . or ..)")
    for group in GROUPS:
        for path, node in group.nodes(cfg[group.name]).items():
            label = str(node.get("name") or "")
            _need(_one_line(label), f"{'.'.join(filter(None, (group.name, path, 'name')))}={label!r} is written into "
                                    "the run's log: no newline or other control character")
    for spec in cfg.eval.tasks:
        _need(_one_line(spec), f"eval.tasks: {spec!r} names a task file and its metric: no newline or other control "
                               "character")


def _one_line(text: str) -> bool:
    """No control character (newline, carriage return, NUL, escape...): the text stays one line of one file name."""
    return not any(unicodedata.category(c) == "Cc" for c in text)
