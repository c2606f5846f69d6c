"""Partial fine-tuning: the embeddings (a tied LM head with them) and the first k transformer blocks frozen.

It only changes `requires_grad` before parallel wrapping, so DDP reduces and FSDP shards exactly what trains, and
the optimizer (optimizer/build.py takes trainable parameters only) keeps state for nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.base.converters import ModelConverter
from effitrain.compression.method import FREEZES, GROUP, TRAINING, Cost
from effitrain.errors import UsageError


@GROUP.option("freeze", order=TRAINING)
@dataclass
class FreezeConfig:
    name: str = "freeze"
    kind: str = "freeze"
    embeddings: bool = True  # freeze the token (and position) embeddings (and a tied LM head with them)
    blocks: int = 1  # freeze the first k transformer blocks


@GROUP.check_of("freeze")
def check(node, cfg) -> None:
    if node.blocks < 0:
        raise UsageError(f"compression.freeze.blocks={node.blocks} must be >= 0")
    if not (node.embeddings or node.blocks > 0):
        raise UsageError("compression=freeze with embeddings=false and blocks=0 freezes nothing")


GROUP.traits("freeze", provides=(FREEZES,))


class Freeze(ModelConverter):
    """Freeze the embeddings (a tied LM head with them: it is the same weight) and the first `blocks` blocks."""

    def __init__(self, *, embeddings: bool, blocks: int):
        self.embeddings, self.blocks = embeddings, blocks

    def convert(self, model):
        from effitrain.model.build import transformer_blocks

        all_blocks = transformer_blocks(model)
        if self.blocks > len(all_blocks):
            raise UsageError(f"compression.freeze.blocks={self.blocks} but the model has {len(all_blocks)} blocks")
        frozen = [*all_blocks[:self.blocks]]
        if self.embeddings:
            frozen.append(model.get_input_embeddings())
            if hasattr(model.base_model, "wpe"):  # GPT-2's learned positions
                frozen.append(model.base_model.wpe)
        for module in frozen:
            module.requires_grad_(False)
        return model


@GROUP.builder("freeze")
def build(cfg, *, context) -> list[ModelConverter]:
    return [Freeze(embeddings=cfg.embeddings, blocks=cfg.blocks)]


# frozen parameters have no gradient, optimizer state or DDP bucket, and blocks before the first trained parameter
# save no activations: the real converter runs on the meta model, whose requires_grad the estimate then reads
GROUP.cost("freeze")(Cost(meta=lambda model, node: Freeze(embeddings=node.embeddings, blocks=node.blocks)
                          .convert(model)))
