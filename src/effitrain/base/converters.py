"""Model transforms behind one small protocol (after torchtitan's ModelConverter), applied in order by a chain.

Precision conversions (fp8 linears, pure bf16) and compression methods implement `ModelConverter`; the trainer
calls the chain at fixed points and never learns their names:

    convert(model)              before parallel wrapping, in place (FSDP then shards what the transform made)
    comm_hook(model)            after DDP wrapping: register a gradient communication hook
    loss_term(logits, batch, lm_loss)  an extra loss added to the LM loss (distillation, regularisers), or None;
                                lm_loss is the step's cross entropy (a term that needs it reuses its graph)
    post_optimizer_hook(model)  after each optimizer step (re-apply masks, refresh scales), fp16-skipped ones too
    state_dict_transform(sd)    on the model state dict before save/export (drop or rename what the transform added)
    export(model)               on the unwrapped, fully loaded model before it is written as a Hugging Face model
                                (merge adapters, turn fake-quantized layers into quantized ones, undo fp8 linears)
    metrics()                   host values for this step's metrics record (bytes communicated, sparsity), read
                                after the step; never a device tensor (a read-back would sync every step)
    state_dict()                plain data the converter needs to continue a resumed run (pruning's step count),
    load_state_dict(sd, model)  the same on every rank; saved with the trainer state, loaded after the model's weights
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the protocol itself needs no torch: a compression method's module defines its converters and
    # registers them torch-free, so the CLI composes and checks before torch loads
    import torch
    from torch import nn


class ModelConverter:
    """A model transform; every hook is a no-op unless a subclass overrides it."""

    # convert() needs the model's real weights (it reads them, or adds parameters initialised from them): a
    # model.pretrained run is then loaded whole on every rank, not shard by shard after wrapping (model/load.py)
    reads_weights: bool = False

    def convert(self, model: nn.Module) -> nn.Module:
        return model

    def comm_hook(self, model: nn.Module) -> None:
        pass

    def loss_term(self, *, logits: torch.Tensor, batch: torch.Tensor, lm_loss: torch.Tensor) -> torch.Tensor | None:
        return None

    def post_optimizer_hook(self, model: nn.Module) -> None:
        pass

    def state_dict_transform(self, state_dict: dict) -> dict:
        return state_dict

    def export(self, model: nn.Module) -> nn.Module:
        return model

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        pass


class ConverterChain(ModelConverter):
    """Several converters applied in order (precision's first, then compression's, as the run lists them)."""

    def __init__(self, converters: list[ModelConverter]):
        self.converters = list(converters)

    @property
    def reads_weights(self) -> bool:
        return any(c.reads_weights for c in self.converters)

    def convert(self, model: nn.Module) -> nn.Module:
        for c in self.converters:
            model = c.convert(model)
        return model

    def comm_hook(self, model: nn.Module) -> None:
        for c in self.converters:
            c.comm_hook(model)

    def loss_term(self, *, logits: torch.Tensor, batch: torch.Tensor, lm_loss: torch.Tensor) -> torch.Tensor | None:
        terms = [t for c in self.converters if (t := c.loss_term(logits=logits, batch=batch, lm_loss=lm_loss))
                 is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def post_optimizer_hook(self, model: nn.Module) -> None:
        for c in self.converters:
            c.post_optimizer_hook(model)

    def state_dict_transform(self, state_dict: dict) -> dict:
        for c in self.converters:
            state_dict = c.state_dict_transform(state_dict)
        return state_dict

    def export(self, model: nn.Module) -> nn.Module:
        for c in reversed(self.converters):  # undone in the reverse order of convert
            model = c.export(model)
        return model

    def metrics(self) -> dict:
        return {k: v for c in self.converters for k, v in c.metrics().items()}

    def state_dict(self) -> dict:
        """Each converter's state under its position and class (a resumed run rebuilds the same chain)."""
        return {f"{i}:{type(c).__name__}": sd for i, c in enumerate(self.converters) if (sd := c.state_dict())}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        for i, c in enumerate(self.converters):
            if (sd := state.get(f"{i}:{type(c).__name__}")) is not None:
                c.load_state_dict(sd, model)

    def __repr__(self) -> str:
        return f"ConverterChain({', '.join(type(c).__name__ for c in self.converters) or 'empty'})"
