"""Builders of the `schedule` group: build_scheduler (transformers' schedulers), stepped once per optimizer step."""

from __future__ import annotations

import math

import torch

from effitrain.schedule import GROUP


def warmup_steps(cfg, max_steps: int) -> int:
    return int(cfg.warmup_ratio * max_steps) if cfg.warmup_ratio is not None else cfg.warmup_steps


def build_scheduler(optimizer: torch.optim.Optimizer, *, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule of the `schedule` group's kind, stepped once per optimizer step.

    Args:
        optimizer: the optimizer whose lr it drives.
        cfg: the `schedule` config group.
        max_steps: optimizer steps in the run (gradient accumulation does not multiply them).
    """
    warmup = min(warmup_steps(cfg, max_steps), max_steps)
    return GROUP.builder_of(cfg.kind)(optimizer, cfg=cfg, warmup=warmup, max_steps=max_steps)


@GROUP.builder("constant")
def constant(optimizer, *, cfg, warmup: int, max_steps: int):
    from transformers import get_scheduler

    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)


@GROUP.builder("cosine")
def cosine(optimizer, *, cfg, warmup: int, max_steps: int):
    from transformers import get_scheduler

    return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=max_steps,
                         scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})


@GROUP.builder("linear")
def linear(optimizer, *, cfg, warmup: int, max_steps: int):
    # linear is WSD without the stable phase
    return _warmup_stable_decay(optimizer, warmup=warmup, decay=max_steps - warmup, max_steps=max_steps,
                                shape="linear", min_lr_ratio=cfg.min_lr_ratio)


@GROUP.builder("wsd")
def wsd(optimizer, *, cfg, warmup: int, max_steps: int):
    return _warmup_stable_decay(optimizer, warmup=warmup, decay=math.ceil(cfg.decay_ratio * (max_steps - warmup)),
                                max_steps=max_steps, shape=cfg.decay_shape, min_lr_ratio=cfg.min_lr_ratio)


def _warmup_stable_decay(optimizer, *, warmup: int, decay: int, max_steps: int, shape: str, min_lr_ratio: float):
    from transformers import get_scheduler

    # transformers' WSD warms up from min_lr_ratio x lr, not from 0
    return get_scheduler("warmup_stable_decay", optimizer, num_warmup_steps=warmup,
                         scheduler_specific_kwargs={"num_stable_steps": max_steps - warmup - decay,
                                                    "num_decay_steps": decay, "decay_type": shape,
                                                    "min_lr_ratio": min_lr_ratio})


@GROUP.builder("inverse-sqrt")
def inverse_sqrt(optimizer, *, cfg, warmup: int, max_steps: int):
    from transformers import get_scheduler

    scheduler = get_scheduler("inverse_sqrt", optimizer, num_warmup_steps=warmup)
    # the floor only acts after warmup, where the lr the scheduler already set (step 0) is unaffected
    scheduler.lr_lambdas = [_FloorAfter(f, warmup=warmup, floor=cfg.min_lr_ratio) for f in scheduler.lr_lambdas]
    return scheduler


class _FloorAfter:
    """lr factor f(step), floored at `floor` once warmup ends (transformers' inverse_sqrt decays without a floor).

    A class, not a closure, so LambdaLR.state_dict() can save it."""

    def __init__(self, f, *, warmup: int, floor: float):
        self.f, self.warmup, self.floor = f, warmup, floor

    def __call__(self, step: int) -> float:
        value = self.f(step)
        return value if step < self.warmup else max(self.floor, value)
