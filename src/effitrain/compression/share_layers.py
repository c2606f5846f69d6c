"""ALBERT-style parameter sharing: every `every` consecutive transformer blocks are one module (the first of the
run), called `every` times. Parameters and optimizer state fall by that factor; FLOPs do not.

The blocks share the module object, not copied tensors: materialising a meta model (`to_empty`) replaces parameters
one by one and would untie tensors shared between modules, while one module is materialised once. FSDP and TP
shard per block and cannot shard one module at two places in the stack: it runs where weights are whole.
Export gives every position its own copy again, so the exported model is a plain transformers model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from effitrain.base.converters import ModelConverter
from effitrain.compression.method import GROUP, STRUCTURE, Cost
from effitrain.errors import UsageError
from effitrain.parallel import WHOLE_WEIGHTS
from effitrain.registry import Need


@GROUP.option("share_layers", order=STRUCTURE)
@dataclass
class ShareLayersConfig:
    name: str = "share-layers"
    kind: str = "share_layers"
    every: int = 2  # each run of `every` consecutive blocks shares the first one's weights (ALBERT)


@GROUP.check_of("share_layers")
def check(node, cfg) -> None:
    if node.every < 2:
        raise UsageError(f"compression.share_layers.every={node.every} must be >= 2 (1 shares nothing)")
    if cfg.model.num_layers % node.every:
        raise UsageError(f"compression.share_layers.every={node.every} does not divide model.num_layers="
                         f"{cfg.model.num_layers}")


GROUP.traits("share_layers", needs=(
    Need(WHOLE_WEIGHTS, "FSDP and TP shard each block in place and cannot shard one module shared by several "
                        "positions"),))


class ShareLayers(ModelConverter):
    def __init__(self, every: int):
        self.every = every

    def convert(self, model):
        from effitrain.model.build import transformer_blocks

        blocks = transformer_blocks(model)
        for i in range(len(blocks)):
            if i % self.every:
                blocks[i] = blocks[i - i % self.every]
        return model

    def export(self, model):
        from effitrain.model.build import transformer_blocks

        blocks, seen = transformer_blocks(model), set()
        for i, block in enumerate(blocks):
            if id(block) in seen:
                blocks[i] = copy.deepcopy(block)
            seen.add(id(block))
        for i, block in enumerate(blocks):  # the attention's cache index follows the position again
            attn = getattr(block, "self_attn", getattr(block, "attn", None))
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = i
        return model


@GROUP.builder("share_layers")
def build(cfg, *, context) -> list[ModelConverter]:
    return [ShareLayers(cfg.every)]


# shared blocks are stored once: the real converter runs on the meta model, whose parameters the estimate then reads
# (named_parameters gives a shared tensor once)
GROUP.cost("share_layers")(Cost(meta=lambda model, node: ShareLayers(node.every).convert(model)))
