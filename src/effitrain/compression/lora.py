"""What trains: LoRA adapters (peft) on a frozen pretrained model, or partial fine-tuning (`freeze`).

Both only change `requires_grad` (and, for LoRA, add adapter modules) before parallel wrapping, so DDP reduces and
FSDP shards exactly what trains, and the optimizer (optim/build.py takes trainable parameters only) keeps state for
nothing else. LoRA must come before `fully_shard`: adapters added after it would be plain per-rank tensors that
never sync.
"""

from __future__ import annotations

import logging

from torch import nn

from effitrain.compression import GROUP
from effitrain.engine.converters import ModelConverter
from effitrain.errors import UsageError
from effitrain.model.build import transformer_blocks

log = logging.getLogger("effitrain")


class Freeze(ModelConverter):
    """Freeze the embeddings (a tied LM head with them: it is the same weight) and the first `blocks` blocks."""

    def __init__(self, *, embeddings: bool, blocks: int):
        self.embeddings, self.blocks = embeddings, blocks

    def convert(self, model: nn.Module) -> nn.Module:
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
def freeze(cfg, *, context) -> list[ModelConverter]:
    return [Freeze(embeddings=cfg.embeddings, blocks=cfg.blocks)]


class Lora(ModelConverter):
    """peft's LoRA injected in place (the model keeps its class and its blocks), every base weight frozen; export
    merges each adapter into its base Linear and puts the plain Linear back."""

    def __init__(self, *, rank: int, alpha: float, dropout: float, target_modules: list[str]):
        from peft import LoraConfig

        self.config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                 target_modules=list(target_modules), bias="none")

    def convert(self, model: nn.Module) -> nn.Module:
        from peft import inject_adapter_in_model

        if any(p.is_meta for p in model.parameters()):  # checks.py requires model.pretrained; guard the API too
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

    def export(self, model: nn.Module) -> nn.Module:
        from peft.tuners.lora import LoraLayer

        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    child.merge()
                    setattr(parent, name, child.get_base_layer())
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def _linear_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@GROUP.builder("lora")
def lora(cfg, *, context) -> list[ModelConverter]:
    return [Lora(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules)]
