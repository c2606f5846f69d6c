"""The `compression` group: model and communication compression methods, each one or more ModelConverters
(base/converters.py). Several combine: `compression=[distill,qat-int8]` (Hydra's list selection); each chosen
option's keys live under its own kind (`compression.distill.alpha`, `compression.qat_int8.weight_dtype`).

A method is one module of this package, registered on import (method.py says what it declares: schema, stage,
checks, traits, builder, cost): share_layers, freeze, lora, qat (int8, int4), prune (magnitude, 2:4), distill,
grad (fp16, PowerSGD). Importing them here needs no torch; their converters import it when built. Adding a method
= its YAML under configs/compression/ + its module here (named in the import line below, which registers it).
"""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.compression import distill, freeze, grad, lora, prune, qat, share_layers  # noqa: F401 (registration)
from effitrain.compression.method import GROUP, Cost
from effitrain.errors import UsageError

__all__ = ["GROUP", "chosen", "in_order"]


@GROUP.option("none", order=0)
@dataclass
class NoCompression:
    name: str = "none"
    kind: str = "none"


GROUP.traits("none")
GROUP.cost("none")(Cost())  # nothing to count


def chosen(cfg) -> list[str]:
    """The kinds of the chosen options ('none' chosen alone means none)."""
    return [k for k in cfg if k != "none"]


def in_order(cfg) -> list:
    """The chosen options' nodes in the order their converters apply (each method's stage, method.py), whatever
    the order the run lists them in."""
    return GROUP.ordered(cfg.values())


@GROUP.checks
def check(cfg) -> None:
    kinds = list(cfg)
    if "none" in kinds and len(kinds) > 1:
        raise UsageError(f"compression=none cannot combine with {', '.join(k for k in kinds if k != 'none')}: "
                         "leave none out of the list")
