"""The machinery of a config group: each option kind's typed schema and its builder, registered in one place.

A group (model, data, precision, parallel, compression, optimizer, schedule, ...) lives in a package of its own:
`__init__.py` declares `GROUP`, one dataclass schema per option kind and the group's own checks (no torch, so the
CLI composes and checks in a fraction of a second); a builders module registers one builder per kind. The YAML
options of the group name their kind's schema in their defaults list (`- /schemas/optimizer/adamw@_here_`), so an
option's keys are exactly what its schema declares: a key another kind owns is an unknown key at composition.

A group whose options combine (`multi`, e.g. `compression=[lora,grad-powersgd]`, Hydra's list selection) holds
one sub-node per chosen option under the option's kind (each YAML's `# @package compression.<kind>` header), so
the chosen methods never overwrite each other's keys; each sub-node is typed by its kind's schema.

Beside its schema and builder, each option declares what it costs and what it is (tests/test_schema.py checks every
option of every group does):
- `@GROUP.cost(kind)`: its cost model, read by the estimate (`effitrain estimate`, the fit check), registered beside
  its builder (the builders module; a precision's, its dtypes, in the torch-free schemas module, since the checks
  read them too); what a cost model is depends on the group (a precision's dtypes, an optimizer's state bytes, a
  layout's memory terms...), the group's cost section says.
- `GROUP.traits(kind, provides=..., needs=..., excludes=...)`: what it offers the other chosen options (a trait
  name: "whole_weights", "comm_hooks", ...), what it needs of them (`Need(trait, why)`: some chosen option or the
  run's device must provide the trait, else one line that ends with `why`), and what no other chosen option may
  provide (`Need(trait, why)` again). `checks.check_traits` is the one rule that reads them.
- `@GROUP.check_of(kind)`: its checks against the rest of the run's config (`fn(node, cfg)`).
A group whose options put nothing on the device and take part in no cross-group rule says why instead
(`Group(standalone=...)`: data, schedule, launcher, logging, checkpoint).

Adding an option = one YAML under configs/<group>/ + its schema, traits, cost and builder in the group's package;
tests/test_schema.py checks they agree.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Union


@dataclass(frozen=True)
class Need:
    """A trait some other chosen option must provide (or, in `excludes`, must not), and why: the end of the one
    line a run that breaks it gets."""

    trait: str
    why: str


# a trait list, or a function of (the option's node, the whole config) giving one (a need that depends on a value)
TraitList = Union[Iterable, Callable]


@dataclass(frozen=True)
class Traits:
    """What an option provides to the others, needs of them, and excludes from them."""

    provides: TraitList = ()
    needs: TraitList = ()
    excludes: TraitList = ()

    def of(self, which: str, node, cfg) -> tuple:
        value = getattr(self, which)
        return tuple(value(node, cfg) if callable(value) else value)


@dataclass
class Group:
    """One config group: schemas and builders keyed by the option kind.

    Args:
        name: the group's name (its directory under configs/ and its key in the composed config).
        key: the field that names an option's kind (`kind`, `strategy`, `family`, ...); None for a group whose
            options all share one schema (then registered as kind `name`).
        builders: the module whose import registers the builders (imported on the first `builder_of`).
        multi: options combine: the group's node maps each chosen option's kind to that option's node.
        standalone: why the group's options need no cost model and no traits (nothing on the device, no rule
            with another group); None: each option registers both.
    """

    name: str
    key: str | None
    builders: str
    multi: bool = False
    standalone: str | None = None
    schemas: dict[str, type] = field(default_factory=dict)
    _builders: dict[str, Callable] = field(default_factory=dict)
    _costs: dict[str, object] = field(default_factory=dict)
    _traits: dict[str, Traits] = field(default_factory=dict)
    _option_checks: dict[str, Callable] = field(default_factory=dict)
    _orders: dict[str, float] = field(default_factory=dict)
    _check: Callable | None = None

    def option(self, kind: str, *, order: float = 0):
        """Class decorator: register `kind`'s schema (a dataclass whose `key` field defaults to `kind`).

        Args:
            order: in a multi group, where `kind`'s builder applies among the chosen options (smaller first),
                whatever the order the run lists them in.
        """
        def register(schema: type) -> type:
            assert kind not in self.schemas, f"{self.name}: option kind {kind!r} registered twice"
            if self.key is not None:
                default = next(f.default for f in fields(schema) if f.name == self.key)
                assert default == kind, f"{schema.__name__}.{self.key} must default to {kind!r}, not {default!r}"
            self.schemas[kind] = schema
            self._orders[kind] = order
            return schema
        return register

    def ordered(self, nodes: Iterable) -> list:
        """Option nodes in the order their builders apply (each kind's `order`)."""
        return sorted(nodes, key=lambda node: self._orders[self.kind_of(node)])

    def builder(self, kind: str):
        """Function decorator: register the builder of `kind` (which must have a schema)."""
        def register(fn: Callable) -> Callable:
            assert kind in self.schemas, f"{self.name}: builder for {kind!r}, which has no schema"
            assert kind not in self._builders, f"{self.name}: builder for {kind!r} registered twice"
            self._builders[kind] = fn
            return fn
        return register

    def cost(self, kind: str):
        """Decorator: register the cost model of `kind` (a function or object: what it is, the group's cost section
        says)."""
        def register(model):
            assert kind in self.schemas, f"{self.name}: cost model for {kind!r}, which has no schema"
            assert kind not in self._costs, f"{self.name}: cost model for {kind!r} registered twice"
            self._costs[kind] = model
            return model
        return register

    def cost_of(self, kind: str):
        """The cost model of `kind` (a UsageError if the option has none: the estimate cannot count it)."""
        from effitrain.errors import UsageError

        if kind not in self._costs:
            importlib.import_module(self.builders)
        if kind not in self._costs:
            raise UsageError(f"{self.name}={kind}: no cost model registered, so effitrain estimate cannot count it")
        return self._costs[kind]

    def all_costs(self) -> dict[str, object]:
        importlib.import_module(self.builders)
        return dict(self._costs)

    def traits(self, kind: str, *, provides: TraitList = (), needs: TraitList = (), excludes: TraitList = ()) -> None:
        """Declare what `kind` provides to the other chosen options, needs of them and excludes from them."""
        assert kind in self.schemas, f"{self.name}: traits for {kind!r}, which has no schema"
        assert kind not in self._traits, f"{self.name}: traits for {kind!r} declared twice"
        self._traits[kind] = Traits(provides=provides, needs=needs, excludes=excludes)

    def traits_of(self, kind: str) -> Traits | None:
        return self._traits.get(kind)

    def provides(self, node, trait: str, cfg=None) -> bool:
        """Whether the option of `node` provides `trait` (cfg: the whole config, for traits that depend on it)."""
        traits = self._traits.get(self.kind_of(node))
        return traits is not None and trait in traits.of("provides", node, cfg)

    def check_of(self, kind: str):
        """Function decorator: `kind`'s checks against the whole config (`fn(node, cfg)`, raise UsageError)."""
        def register(fn: Callable) -> Callable:
            assert kind in self.schemas, f"{self.name}: checks for {kind!r}, which has no schema"
            self._option_checks[kind] = fn
            return fn
        return register

    def check_options(self, cfg) -> None:
        """Each chosen option's checks against the whole config."""
        for node in self.nodes(cfg[self.name]).values():
            fn = self._option_checks.get(self.kind_of(node))
            if fn is not None:
                fn(node, cfg)

    def checks(self, fn: Callable) -> Callable:
        """Function decorator: the group's own checks, given its config node (raise UsageError)."""
        self._check = fn
        return fn

    def check(self, node) -> None:
        if self._check is not None:
            self._check(node)

    def kind_of(self, node) -> str:
        return self.name if self.key is None else node[self.key]

    def schema_of(self, node) -> type:
        """The schema of a config node, from its kind (a UsageError names the kinds there are)."""
        from effitrain.errors import UsageError

        kind = self.kind_of(node)
        if kind not in self.schemas:
            raise UsageError(f"{self.name}.{self.key}={kind!r} is not one of: {', '.join(self.schemas)}")
        return self.schemas[kind]

    def nodes(self, node) -> dict:
        """The option nodes of a group's node, keyed by their path under the group: {"": node} for a one-option
        group, {kind: sub-node, ...} for a multi group (in the order the run lists them)."""
        return dict(node.items()) if self.multi else {"": node}

    def builder_of(self, kind: str) -> Callable:
        importlib.import_module(self.builders)
        return self._builders[kind]

    def all_builders(self) -> dict[str, Callable]:
        importlib.import_module(self.builders)
        return dict(self._builders)

    @property
    def schema_group(self) -> str:
        """The ConfigStore group of this group's schemas: apart from its options, so that Hydra's glob() and
        --help list the options only."""
        return f"schemas/{self.name}"

    def schema_name(self, kind: str) -> str:
        """The defaults-list entry an option YAML names its kind's schema with (merged into the option's node)."""
        return f"/{self.schema_group}/{kind}@_here_"
