"""TrainState: everything a run must carry to continue exactly where it stopped.

Model and optimizer go through `torch.distributed.checkpoint.state_dict` (get_state_dict / set_state_dict), so
under FSDP/TP each rank gives and takes only its own shards, never a gathered copy. The data position is the step
alone: the sampler is a pure function of (seed, step, micro-step, rank).

A state dict has four parts:
    model       tensors (DTensor shards under FSDP/TP)
    optimizer   tensors + hyperparameters, keyed by parameter name (absent under ZeRO-1: see `local`)
    trainer     scheduler, loss scaler, step, tokens seen, skipped steps, the converters' own state (pruning's
                schedule): the same on every rank
    local       this rank's own: RNG states (torch CPU and CUDA, Python, NumPy), ZeRO-1's optimizer shard
`trainer` and `local` are plain data serialised by torch.save, loadable with weights_only=True.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import nn

from effitrain.base.converters import ModelConverter
from effitrain.engine.runtime import rng_state, set_rng_state


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    converters: ModelConverter
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # training tokens consumed (all ranks)
    skipped_steps: int = 0  # optimizer steps skipped (fp16 overflow, non-finite gradients) as of the last flush
    # optimizer state keyed per parameter name, param groups too (pipeline layouts: each rank's optimizer holds other
    # parameters, and DCP keeps one rank's copy of a list of param groups saved under one key by every rank)
    flatten_optimizer: bool = False

    def state_dict(self, *, model_only: bool = False) -> dict:
        """The full state (this rank's shards); `model_only`: the model and the counters."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        trainer = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                   "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                   "converters": self.converters.state_dict()}
        if model_only:
            return {"model": get_model_state_dict(self.model), "trainer": trainer}
        local = {"rng": rng_state()}
        if self._zero1():  # its shards are per rank and positional: get_state_dict cannot name them
            model, local["optimizer"] = get_model_state_dict(self.model), self.optimizer.optim.state_dict()
            return {"model": model, "trainer": trainer, "local": local}
        model, optimizer = get_state_dict(self.model, self.optimizer, options=self._options())
        return {"model": model, "optimizer": optimizer, "trainer": trainer, "local": local}

    def load_state_dict(self, state: dict) -> None:
        """Load what `state` holds: a full state, a model-only one, or model + optimizer (a fine-tuning start)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if "optimizer" in state:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=self._options())
        else:
            set_model_state_dict(self.model, state["model"])
        local = state.get("local", {})
        if "optimizer" in local:
            self.optimizer.optim.load_state_dict(local["optimizer"])
            # the scheduler sets lr on the ZeRO wrapper's groups, which it copies into its shard's at each step
            self.optimizer._sync_param_groups(self.optimizer.optim.param_groups, self.optimizer.param_groups)
        if "rng" in local:
            set_rng_state(local["rng"])
        if "trainer" in state:  # resuming (a new run from a checkpoint's weights starts its own schedule)
            trainer = state["trainer"]
            self.scheduler.load_state_dict(trainer["scheduler"])
            if self.scaler.is_enabled():
                self.scaler.load_state_dict(trainer["scaler"])
            self.step, self.tokens_seen = trainer["step"], trainer["tokens_seen"]
            self.skipped_steps = trainer["skipped_steps"]
            self.converters.load_state_dict(trainer.get("converters", {}), self.model)  # after the weights

    # --- the checkpoint form: plain parts as weights_only-loadable blobs, the rank-local part under its rank ---

    def checkpoint_state_dict(self, *, rank: int, model_only: bool = False) -> dict:
        state = self.state_dict(model_only=model_only)
        state["trainer"] = _blob(state["trainer"])
        if "local" in state:
            state[f"rank{rank}"] = _blob(state.pop("local"))
        return state

    def load_checkpoint_state_dict(self, state: dict, *, rank: int) -> None:
        """Load what DCP filled into (a subset of) a checkpoint_state_dict's keys."""
        plain = {k: state[k] for k in ("model", "optimizer") if k in state}
        if "trainer" in state:
            plain["trainer"] = _unblob(state["trainer"])
        if f"rank{rank}" in state:
            plain["local"] = _unblob(state[f"rank{rank}"])
        self.load_state_dict(plain)

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=self.flatten_optimizer)

    def rank_local_required(self) -> bool:
        """True when a rank's own part holds state that cannot be rebuilt (ZeRO-1's optimizer shard)."""
        return self._zero1()

    def _zero1(self) -> bool:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return isinstance(self.optimizer, ZeroRedundancyOptimizer)

    def export_state_dict(self) -> dict:
        """The model's weights as a shipped model holds them: each converter drops or renames what it added."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return self.converters.state_dict_transform(get_model_state_dict(self.model))


def _blob(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unblob(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)
