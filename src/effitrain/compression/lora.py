"""LoRA adapters (peft) on a frozen pretrained model.

It only adds adapter modules and changes `requires_grad` before parallel wrapping, so DDP reduces and FSDP shards
exactly what trains, and the optimizer (optimizer/build.py takes trainable parameters only) keeps state for nothing
else. LoRA must come before `fully_shard`: adapters added after it would be plain per-rank tensors that never sync.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import List

from effitrain.base.converters import ModelConverter
from effitrain.compression.method import FAKE_QUANTIZES, FREEZES, GROUP, MASKS, TRAINING, Cost
from effitrain.errors import UsageError
from effitrain.model import PRETRAINED
from effitrain.parallel import CONVERTED_MODULES
from effitrain.registry import Need

log = logging.getLogger("effitrain")


@GROUP.option("lora", order=TRAINING + 1)
@dataclass
class LoraConfig:
    name: str = "lora"
    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@GROUP.check_of("lora")
def check(node, cfg) -> None:
    if node.rank <= 0:
        raise UsageError(f"compression.lora.rank={node.rank} must be a positive integer")
    if not 0 <= node.dropout < 1:
        raise UsageError(f"compression.lora.dropout={node.dropout} must lie in [0, 1)")
    if len(node.target_modules) == 0:
        raise UsageError("compression.lora.target_modules is empty: name the Linear layers to adapt")


GROUP.traits("lora", needs=(
    Need(CONVERTED_MODULES, "the TP plans do not cover peft's adapter layers"),
    Need(PRETRAINED, "adapts a pretrained model: set model.pretrained=<local HF model directory> (its random frozen "
                     "weights would learn next to nothing)"),
), excludes=(
    Need(FREEZES, "lora already freezes every base weight"),
    Need(MASKS, "pruning would mask the frozen base weights LoRA adapts"),
    Need(FAKE_QUANTIZES, "QAT would fake-quantize the base weights under the adapters"),
))


class Lora(ModelConverter):
    """peft's LoRA injected in place (the model keeps its class and its blocks), every base weight frozen; export
    merges each adapter into its base Linear and puts the plain Linear back."""

    reads_weights = True  # peft injects its adapters into real Linears (it refuses meta ones)

    def __init__(self, *, rank: int, alpha: float, dropout: float, target_modules: list[str]):
        from peft import LoraConfig

        self.config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                 target_modules=list(target_modules), bias="none")

    def convert(self, model):
        from peft import inject_adapter_in_model

        if any(p.is_meta for p in model.parameters()):  # the traits require model.pretrained; guard the API too
            raise UsageError("compression=lora adapts a pretrained model: set model.pretrained=<HF model directory>")
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in self.config.target_modules if t not in present]
        if missing:
            raise UsageError(f"compression.lora.target_modules: the model has no {', '.join(sorted(missing))} "
                             f"modules (its Linears: {', '.join(sorted(_linear_names(model)))})")
        model = inject_adapter_in_model(self.config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return model

    def export(self, model):
        from peft.tuners.lora import LoraLayer

        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    child.merge()
                    setattr(parent, name, child.get_base_layer())
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def _linear_names(model) -> set[str]:
    from torch import nn

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@GROUP.builder("lora")
def build(cfg, *, context) -> list[ModelConverter]:
    return [Lora(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules)]


def _adapters(model, params: list, node) -> list:
    """Every base weight frozen; rank x in (lora_A) and out x rank (lora_B) trainable per targeted Linear. Counted
    from the config: peft adapts real weights only, not meta ones."""
    from torch import nn

    param = type(params[0])  # the estimate's Param (importing it would make estimate -> compression a cycle)
    adapters = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in node.target_modules:
            adapters += [param(f"{name}.lora_A.weight", (node.rank, module.in_features), "linear"),
                         param(f"{name}.lora_B.weight", (module.out_features, node.rank), "linear")]
    return [replace(p, trainable=False) for p in params] + adapters


GROUP.cost("lora")(Cost(params=_adapters))
