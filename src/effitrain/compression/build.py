"""Builders of the `compression` group: each kind's ModelConverters (applied by the trainer with precision's)."""

from __future__ import annotations

from effitrain.compression import GROUP
from effitrain.converters import ModelConverter


def build_compression(cfg) -> list[ModelConverter]:
    """The converters of the `compression` group's kind, in the order they apply.

    Args:
        cfg: the `compression` config group.
    """
    return GROUP.builder_of(cfg.kind)(cfg)


@GROUP.builder("none")
def none(cfg) -> list[ModelConverter]:
    return []
