"""ALBERT-style parameter sharing: every `every` consecutive transformer blocks are one module (the first of the
run), called `every` times. Parameters and optimizer state fall by that factor; FLOPs do not.

The blocks share the module object, not copied tensors: materialising a meta model (`to_empty`) replaces parameters
one by one and would untie tensors shared between modules, while one module is materialised once. FSDP and TP
shard per block and cannot shard one module at two places in the stack: checks.py allows single and ddp only.
Export gives every position its own copy again, so the exported model is a plain transformers model.
"""

from __future__ import annotations

import copy

from torch import nn

from effitrain.compression import GROUP
from effitrain.engine.converters import ModelConverter
from effitrain.model.build import transformer_blocks


class ShareLayers(ModelConverter):
    def __init__(self, every: int):
        self.every = every

    def convert(self, model: nn.Module) -> nn.Module:
        blocks = transformer_blocks(model)
        for i in range(len(blocks)):
            if i % self.every:
                blocks[i] = blocks[i - i % self.every]
        return model

    def export(self, model: nn.Module) -> nn.Module:
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
def share_layers(cfg, *, context) -> list[ModelConverter]:
    return [ShareLayers(cfg.every)]
