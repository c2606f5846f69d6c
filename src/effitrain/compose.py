"""The one place that turns overrides into typed, checked configs: the CLI, the torchrun/srun entry, `reproduce`,
the tests and the scripts all compose through here.

A composed config is the top-level schema (`TrainConfig`: seed, steps, batch...) plus one node per config group,
each typed by the schema of its option's kind (registry.py). No torch here, and Hydra only once composing starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effitrain import checkpoint, compression, data, launcher, model, optimizer, parallel, precision, schedule
from effitrain import logging as logging_group  # not the standard library's logging
from effitrain.errors import UsageError, unknown_key
from effitrain.errors import explain as _explain
from effitrain.errors import first_line as _first_line
from effitrain.eval import EvalConfig
from effitrain.registry import Group

# the defaults list of configs/train.yaml, in its order
GROUPS: tuple[Group, ...] = (model.GROUP, data.GROUP, precision.GROUP, parallel.GROUP, compression.GROUP,
                             optimizer.GROUP, schedule.GROUP, launcher.GROUP, logging_group.GROUP, checkpoint.GROUP)
GROUP_NAMES = tuple(g.name for g in GROUPS)
PRESETS = "experiment"  # the group of named presets (`# @package _global_`): not in the defaults list


@dataclass
class TrainConfig:
    """The top-level keys; each group's node is typed by its option's schema (Any here, so any kind fits)."""

    model: Any = None
    data: Any = None
    precision: Any = None
    parallel: Any = None
    compression: Any = None
    optimizer: Any = None
    schedule: Any = None
    launcher: Any = None
    logging: Any = None
    checkpoint: Any = None
    name: str = "run"
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = 120
    batch_size: int = 16  # sequences per device per micro-step
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 = measure only
    eval_every: int = 40
    eval_batches: int = 8
    eval: EvalConfig = field(default_factory=EvalConfig)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    cpu_keep_freed_memory: bool = True  # CPU: freed step memory stays in the heap (glibc), no page faults next step
    nan_policy: str = "abort"  # a step whose gradient norm is not finite is skipped; abort | skip: what follows
    nan_patience: int = 10  # abort: stop after this many consecutive non-finite steps (fp16 overflow skips count)


def config_dir() -> Path:
    """The config tree: inside the package for a wheel, ./configs for a source checkout."""
    packaged = Path(__file__).parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def group_options(group: str) -> list[str]:
    """Names of the YAML options of one config group, sorted."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def register_configs() -> None:
    """Put the top-level schema and every kind's schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for group in GROUPS:
        for kind, schema in group.schemas.items():
            store.store(group=group.schema_group, name=kind, node=_schema_node(schema))


def _schema_node(schema: type):
    """A kind's schema as Hydra composes it: a field typed Dict holds names the user chooses (data.sources), not
    schema keys, so `data.sources.docs={...}` adds an entry without `+`; every other key stays closed."""
    import typing

    from omegaconf import OmegaConf

    node = OmegaConf.structured(schema)
    for key, hint in typing.get_type_hints(schema).items():
        if typing.get_origin(hint) is dict:
            OmegaConf.set_struct(node[key], False)
    return node


def normalize(args: list[str]) -> list[str]:
    """`+group=option` selects an option like `group=option` (the group is already in the defaults list);
    `experiment=name` becomes `+experiment=name`, since presets are not in the defaults list until chosen."""
    def one(a: str) -> str:
        key = a.lstrip("+").split("=", 1)[0] if "=" in a else None
        if key == PRESETS:
            return "+" + a.lstrip("+")
        return a[1:] if a.startswith("+") and key in GROUP_NAMES else a
    from effitrain.sweep.sweepers import quote_params

    return quote_params([one(a) for a in args])


def compose_all(overrides: list[str], *, multirun: bool = False, hydra: bool = False):
    """Yield the config of every job the overrides describe (each point of a sweep), typed and schema-checked.

    The jobs of a sweep are the ones Hydra itself would launch: the configured sweeper (hydra/sweeper=...) expands
    the overrides with Hydra's parser (so glob(), range(), sort()... mean what Hydra says), and each job is composed
    as Hydra's launcher composes it. A search sweeper whose jobs are not known in advance (Optuna) names the points
    that bound its search space instead (effitrain.sweep.sweepers).

    Args:
        overrides: Hydra overrides, already normalized.
        multirun: sweep overrides (`a=1,2`) expand into one config per job; without it they are an error.
        hydra: keep the `hydra` node (run/sweep directories) in each config.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        try:
            parsed = parser.parse_overrides(overrides)
        except HydraException as e:
            raise UsageError(_first_line(e)) from None
        settings = [o.input_line for o in parsed if o.get_key_element().startswith("hydra")]
        task = [o for o in parsed if not o.get_key_element().startswith("hydra")]
        if multirun:
            from effitrain.sweep.sweepers import planned_jobs

            jobs = planned_jobs(loader, overrides)
        else:
            sweep = next((o for o in task if o.is_sweep_override()), None)
            if sweep is not None:
                raise UsageError(f"{sweep.input_line} is a sweep: add -m to run each value, or quote a string value")
            jobs = [[o.input_line for o in task]]
        for job in jobs:
            check_options(parser.parse_overrides(job))
            _check_repeated_keys(job)
            try:  # what Hydra's launcher composes for the job (its hydra overrides first, as load_sweep_config does)
                cfg = compose(config_name="train", overrides=[*settings, *job], return_hydra_config=hydra)
            except (HydraException, OmegaConfBaseException) as e:
                raise UsageError(_explain(e)) from None
            check_schema(cfg)
            yield cfg


def compose_one(overrides: list[str], **kwargs):
    """The config of a single job (no sweep)."""
    return next(compose_all(overrides, **kwargs))


def check_schema(cfg) -> None:
    """Keys Hydra let in with `+key=value` must still be keys of their option's schema (nothing silently ignored),
    and an option's kind is chosen with the option, not by overriding its kind key."""
    from omegaconf import OmegaConf

    typed(OmegaConf.to_container(cfg))
    for group in GROUPS:
        for path, node in group.nodes(cfg[group.name]).items():
            where = ".".join(filter(None, (group.name, path)))
            if group.key is not None and (OmegaConf.get_type(node) is not group.schema_of(node)
                                          or group.multi and path != group.kind_of(node)):
                raise UsageError(f"{where}.{group.key}={group.kind_of(node)} would run the {group.name} option "
                                 f"{node.name!r} with another kind's builder; choose the option instead "
                                 f"({group.name}=<option>, effitrain --help lists them)")


def typed(container: dict):
    """A plain config (saved by a run, handed to a worker, or a composed one) typed by the top-level schema and each
    group's schema for its kind. An unknown key, a missing group or a wrong type is a UsageError."""
    from omegaconf import OmegaConf

    plain = {k: v for k, v in container.items() if k != "hydra"}
    cfg = _merged(TrainConfig, {k: v for k, v in plain.items() if k not in GROUP_NAMES}, prefix="")
    for group in GROUPS:
        values = plain.get(group.name)
        if not isinstance(values, dict):
            raise UsageError(f"the config has no {group.name} group (effitrain train --cfg job lists them)")
        if group.multi:
            node = OmegaConf.create({})
            for kind, sub in values.items():
                if not isinstance(sub, dict) or sub.get(group.key) != kind:
                    raise UsageError(f"{group.name}.{kind} is not the node of a chosen {kind} option: choose options "
                                     f"with {group.name}=[option,...] (effitrain --help lists them)")
                node[kind] = _merged(group.schema_of(sub), sub, prefix=f"{group.name}.{kind}.")
            cfg[group.name] = node
        else:
            cfg[group.name] = _merged(group.schema_of(values), values, prefix=f"{group.name}.")
    OmegaConf.set_struct(cfg, True)
    return cfg


def _merged(schema: type, values: dict, *, prefix: str):
    """`values` over `schema`'s defaults, typed; errors name the key from the config's root."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    try:
        return OmegaConf.merge(OmegaConf.structured(schema), values)
    except ConfigKeyError as e:
        raise UsageError(unknown_key(prefix + e.full_key)) from None
    except OmegaConfBaseException as e:
        e.full_key = prefix + (e.full_key or "")
        raise UsageError(_explain(e)) from None


def apply_overrides(cfg, overrides: list[str]):
    """`key=value` overrides on a loaded run config (resume: e.g. max_steps=500). The run's options stay its
    own: selecting another option of a group (`model=llama-150m`) or changing the model is refused."""
    from omegaconf import OmegaConf

    if not overrides:
        return cfg
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o or o.startswith(("+", "~", "-")):
            raise UsageError(f"{o!r}: give key=value overrides of the saved config (e.g. max_steps=500)")
        if key in GROUP_NAMES:
            raise UsageError(f"{o}: a resumed run keeps its {key} option; start a new run from this one's weights "
                             "instead (effitrain train ... checkpoint.resume_from=RUN_DIR)")
        if key.startswith("model."):
            raise UsageError(f"{o}: the checkpoint's weights fix the model; start a new run instead "
                             "(effitrain train ... checkpoint.resume_from=RUN_DIR)")
    merged = OmegaConf.merge(OmegaConf.to_container(cfg), OmegaConf.from_dotlist(overrides))
    return typed(OmegaConf.to_container(merged))


def check_options(parsed) -> None:
    """Options chosen for the groups (and presets) exist: a clearer line than Hydra's missing-config error."""
    for o in parsed:
        if (o.key_or_group in GROUP_NAMES and o.is_add() is False or o.key_or_group == PRESETS) and not o.is_delete():
            for option in _selected(o.key_or_group, o.get_value_element_as_str()):
                _check_option(o.key_or_group, option)


def _check_repeated_keys(overrides: list[str]) -> None:
    """A dict value that names a key twice (`data.sources={a:{...},a:{...}}`): Hydra would keep the last silently."""
    from antlr4 import CommonTokenStream, InputStream
    from hydra.grammar.gen.OverrideLexer import OverrideLexer
    from hydra.grammar.gen.OverrideParser import OverrideParser

    def repeated(node) -> str | None:
        if isinstance(node, OverrideParser.DictContainerContext):
            keys = [c.dictKey().getText() for c in node.getChildren()
                    if isinstance(c, OverrideParser.DictKeyValuePairContext)]
            twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if twice is not None:
                return twice
        return next(filter(None, map(repeated, node.getChildren() if hasattr(node, "getChildren") else ())), None)

    for line in overrides:
        if "{" in line:  # parsed once already (compose_all): no syntax errors left
            key = repeated(OverrideParser(CommonTokenStream(OverrideLexer(InputStream(line)))).override())
            if key is not None:
                raise UsageError(f"{line.split('=', 1)[0]}: the key {key!r} appears twice in one value; name each once")


def _selected(group: str, value: str) -> list[str]:
    """The options one override value selects: one, or a list (`[lora,grad-powersgd]`) for a multi group."""
    multi = next((g.multi for g in GROUPS if g.name == group), False)
    if multi and value.startswith("[") and value.endswith("]"):
        options = [v.strip() for v in value[1:-1].split(",") if v.strip()]
        if not options:
            raise UsageError(f"{group}=[] selects nothing: use {group}=none")
        return options
    return [value]


def _check_option(group: str, option: str) -> None:
    options = group_options(group)
    if option not in options:
        raise UsageError(f"unknown {group} option {option!r}; choose one of: {', '.join(options)}")
