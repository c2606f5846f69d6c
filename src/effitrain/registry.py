"""The machinery of a config group: each option kind's typed schema and its builder, registered in one place.

A group (model, data, precision, parallel, compression, optimizer, schedule, ...) lives in a package of its own:
`__init__.py` declares `GROUP`, one dataclass schema per option kind and the group's own checks (no torch, so the
CLI composes and checks in a fraction of a second); a builders module registers one builder per kind. The YAML
options of the group name their kind's schema in their defaults list (`- /schemas/optimizer/adamw@_here_`), so an
option's keys are exactly what its schema declares: a key another kind owns is an unknown key at composition.

A group whose options combine (`multi`, e.g. `compression=[lora,grad-powersgd]`, Hydra's list selection) holds
one sub-node per chosen option under the option's kind (each YAML's `# @package compression.<kind>` header), so
the chosen methods never overwrite each other's keys; each sub-node is typed by its kind's schema.

Adding an option = one YAML under configs/<group>/ + one schema (`@GROUP.option(kind)`) + one builder
(`@GROUP.builder(kind)`), all in the group's package; tests/test_schema.py checks the three agree.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from typing import Callable


@dataclass
class Group:
    """One config group: schemas and builders keyed by the option kind.

    Args:
        name: the group's name (its directory under configs/ and its key in the composed config).
        key: the field that names an option's kind (`kind`, `strategy`, `family`, ...); None for a group whose
            options all share one schema (then registered as kind `name`).
        builders: the module whose import registers the builders (imported on the first `builder_of`).
        multi: options combine: the group's node maps each chosen option's kind to that option's node.
    """

    name: str
    key: str | None
    builders: str
    multi: bool = False
    schemas: dict[str, type] = field(default_factory=dict)
    _builders: dict[str, Callable] = field(default_factory=dict)
    _check: Callable | None = None

    def option(self, kind: str):
        """Class decorator: register `kind`'s schema (a dataclass whose `key` field defaults to `kind`)."""
        def register(schema: type) -> type:
            assert kind not in self.schemas, f"{self.name}: option kind {kind!r} registered twice"
            if self.key is not None:
                default = next(f.default for f in fields(schema) if f.name == self.key)
                assert default == kind, f"{schema.__name__}.{self.key} must default to {kind!r}, not {default!r}"
            self.schemas[kind] = schema
            return schema
        return register

    def builder(self, kind: str):
        """Function decorator: register the builder of `kind` (which must have a schema)."""
        def register(fn: Callable) -> Callable:
            assert kind in self.schemas, f"{self.name}: builder for {kind!r}, which has no schema"
            assert kind not in self._builders, f"{self.name}: builder for {kind!r} registered twice"
            self._builders[kind] = fn
            return fn
        return register

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
