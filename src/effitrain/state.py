"""TrainState: everything a run must carry to continue exactly where it stopped.

Model and optimizer go through `torch.distributed.checkpoint.state_dict` (get_state_dict / set_state_dict), so
under FSDP/TP each rank gives and takes only its own shards, never a gathered copy. The data position is the step
alone: the sampler is a pure function of (seed, step, micro-step, rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effitrain.converters import ModelConverter
from effitrain.runtime import rng_state, set_rng_state


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    converters: ModelConverter
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # training tokens consumed (all ranks)
    skipped_steps: int = 0  # fp16: optimizer steps the loss scaler skipped (as of the last metrics flush)

    def state_dict(self) -> dict:
        """The full state: model and optimizer (this rank's shards), scheduler, loss scaler, counters, this rank's
        RNG states."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps, "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]
        set_rng_state(state["rng"])

    def export_state_dict(self) -> dict:
        """The model's weights as a shipped model holds them: each converter drops or renames what it added."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return self.converters.state_dict_transform(get_model_state_dict(self.model))
