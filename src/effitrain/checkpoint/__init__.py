"""The `checkpoint` group: when a run saves its TrainState, where, how many it keeps, and what it starts from.

Schemas and checks here (no torch); the builder (a Checkpointer) and the DCP machinery in
`effitrain.checkpoint.store`; the manifest and the directory layout in `effitrain.checkpoint.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("checkpoint", key="kind", builders="effitrain.checkpoint.store",
              standalone="checkpoints are written from host copies, outside the step the estimate models")


@dataclass
class CheckpointBase:
    name: str = "default"
    kind: str = "sync"
    resume_from: Optional[str] = None  # a checkpoint (or a run dir: its latest) whose weights start this new run
    load_optimizer: bool = False  # with resume_from: also take its optimizer state (the step still starts at 0)


@GROUP.option("off")
@dataclass
class NoCheckpoint(CheckpointBase):
    name: str = "off"
    kind: str = "off"  # nothing saved: a crash, a restart or `effitrain resume` starts from step 0


@dataclass
class SavingCheckpoint(CheckpointBase):
    every: int = 40  # optimizer steps between saves; 0 = only the final save
    keep_last: int = 2  # complete checkpoints kept (older ones deleted once a newer one is complete); 0 = all
    dir: Optional[str] = None  # None = <run dir>/checkpoints
    save_final: bool = True  # save after the last step too
    model_only: bool = False  # the final save holds the model weights only (smaller; export, not resume)


@GROUP.option("sync")
@dataclass
class SyncCheckpoint(SavingCheckpoint):
    kind: str = "sync"  # training waits while the state is written


@GROUP.option("async")
@dataclass
class AsyncCheckpoint(SavingCheckpoint):
    name: str = "async"
    kind: str = "async"  # torch.distributed.checkpoint.async_save: copied to host memory, written by a thread


@GROUP.checks
def check(cfg) -> None:
    if cfg.kind != "off":
        if cfg.every < 0 or cfg.keep_last < 0:
            raise UsageError(f"checkpoint.every={cfg.every} and checkpoint.keep_last={cfg.keep_last} must be >= 0")
        if cfg.every == 0 and not cfg.save_final:
            raise UsageError("checkpoint.every=0 with checkpoint.save_final=false saves nothing: use checkpoint=off")
    if cfg.load_optimizer and not cfg.resume_from:
        raise UsageError("checkpoint.load_optimizer=true needs checkpoint.resume_from=PATH")
