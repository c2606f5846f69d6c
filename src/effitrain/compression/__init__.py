"""The `compression` group: model and communication compression methods, each a ModelConverter (converters.py).

Today only `none`; gradient compression, QAT, pruning, distillation and LoRA plug in here as kinds (issue 11).
Schemas here (no torch); builders in `effitrain.compression.build`.
"""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.registry import Group

GROUP = Group("compression", key="kind", builders="effitrain.compression.build")


@GROUP.option("none")
@dataclass
class NoCompression:
    name: str = "none"
    kind: str = "none"
