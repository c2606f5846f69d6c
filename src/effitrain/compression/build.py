"""Builders of the `compression` group: each chosen method's ModelConverters (applied by the trainer after
precision's), in the methods' stage order (method.py), whatever the order the run lists them in. Each method's
builder is registered in its own module."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from effitrain.base.converters import ModelConverter
from effitrain.compression import GROUP, in_order

log = logging.getLogger("effitrain")


@dataclass
class Context:
    """What some methods need beyond their own sub-config (the run's shape, not its whole config).

    Args:
        seed: the run's seed (PowerSGD's random projections).
        world: the process's World (distill: the teacher's device).
        job: the process's Job (distill: a sharded teacher on the student's mesh).
        parallel: the `parallel` config group (distill: shard the teacher like the student).
        precision: the run's Precision (distill: the teacher's dtype).
        vocab_size: the tokenizer's vocabulary size.
        tokenizer: the run's tokenizer.json (distill checks the teacher's against it), or None where unknown.
        seq_len: tokens per sequence.
        tokens_per_step: tokens one rank processes per optimizer step.
        model_dir: `path -> an HF model directory` (export.model_dir: a run directory's latest checkpoint,
            exported once); distill loads a run-directory teacher through it.
    """

    seed: int
    world: object = None
    job: object = None
    parallel: object = None
    precision: object = None
    vocab_size: int = 0
    tokenizer: Path | None = None
    seq_len: int = 0
    tokens_per_step: int = 0
    model_dir: Callable[[Path], Path] | None = None


def build_compression(cfg, *, context: Context) -> list[ModelConverter]:
    """The converters of every chosen method of the `compression` group, in the order they apply.

    Args:
        cfg: the `compression` config group (one sub-node per chosen method, keyed by its kind).
        context: the run's shape.
    """
    nodes = in_order(cfg)
    log.info(f"compression: {', '.join(node.name for node in nodes)}")
    return [c for node in nodes for c in GROUP.builder_of(node.kind)(node, context=context)]


@GROUP.builder("none")
def none(cfg, *, context) -> list[ModelConverter]:
    return []
