"""The `schedule` group: learning-rate schedules (transformers' schedulers), stepped once per optimizer step.

Schemas and checks here (no torch); builders in `effitrain.schedule.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("schedule", key="kind", builders="effitrain.schedule.build",
              standalone="a schedule sets the learning rate of each step: no memory, no FLOPs, no other group's "
                         "concern")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass
class ScheduleBase:
    name: str = "cosine"
    kind: str = "cosine"
    warmup_steps: int = 10
    warmup_ratio: Optional[float] = None  # overrides warmup_steps when set


@GROUP.option("constant")
@dataclass
class ConstantSchedule(ScheduleBase):
    kind: str = "constant"


@dataclass
class DecayingBase(ScheduleBase):
    min_lr_ratio: float = 0.1  # the lr at the end (or the floor) as a share of the peak


@GROUP.option("cosine")
@dataclass
class CosineSchedule(DecayingBase):
    kind: str = "cosine"


@GROUP.option("linear")
@dataclass
class LinearSchedule(DecayingBase):
    kind: str = "linear"


@GROUP.option("wsd")
@dataclass
class WSDSchedule(DecayingBase):
    kind: str = "wsd"
    decay_ratio: float = 0.2  # share of the post-warmup steps spent decaying
    decay_shape: str = "1-sqrt"  # linear | cosine | 1-sqrt (transformers' WSD decay types)


@GROUP.option("inverse-sqrt")
@dataclass
class InverseSqrtSchedule(DecayingBase):
    kind: str = "inverse-sqrt"
    min_lr_ratio: float = 0.0


@GROUP.checks
def check(cfg) -> None:
    if cfg.warmup_steps < 0:
        raise UsageError(f"schedule.warmup_steps={cfg.warmup_steps} must be >= 0")
    if cfg.warmup_ratio is not None and not 0 <= cfg.warmup_ratio < 1:
        raise UsageError(f"schedule.warmup_ratio={cfg.warmup_ratio} must lie in [0, 1) "
                         "(or be null to use warmup_steps)")
    if "min_lr_ratio" in cfg and not 0 <= cfg.min_lr_ratio <= 1:
        raise UsageError(f"schedule.min_lr_ratio={cfg.min_lr_ratio} must lie in [0, 1]")
    if cfg.kind == "wsd" and not 0 < cfg.decay_ratio <= 1:
        raise UsageError(f"schedule.decay_ratio={cfg.decay_ratio} must lie in (0, 1]")
    if cfg.kind == "wsd" and cfg.decay_shape not in DECAY_SHAPES:
        raise UsageError(f"schedule.decay_shape={cfg.decay_shape!r} is not one of: {', '.join(DECAY_SHAPES)}")
