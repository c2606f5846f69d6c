"""Optimizer and learning-rate schedule from their config groups."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, *, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """Two groups: decayed weights, and the parameters no_decay names (bias, norm, embedding)."""
    skip_ids = set()
    for module_name, module in model.named_modules():
        kind = ("embedding" if isinstance(module, nn.Embedding) else
                "norm" if "norm" in type(module).__name__.lower() or "ln" in module_name.split(".")[-1] else None)
        for name, p in module.named_parameters(recurse=False):
            if kind in no_decay or ("bias" in no_decay and name == "bias"):
                skip_ids.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in skip_ids], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in skip_ids], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, cfg, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of the `optimizer` group.

    Args:
        model: the (possibly wrapped) model whose parameters train.
        cfg: the `optimizer` config group.
        device: where the parameters live (picks the fused/foreach implementation under `auto`).
    """
    groups = param_groups(model, weight_decay=cfg.weight_decay, no_decay=list(cfg.no_decay))
    if cfg.kind == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 **_implementation(cfg.implementation, device))
    raise ValueError(f"optimizer.kind={cfg.kind!r} is not supported")


def _implementation(choice: str, device: torch.device) -> dict:
    # fused kernels win on CUDA; on CPU the foreach (multi-tensor) path is the fast one
    if choice == "auto":
        choice = "fused" if device.type == "cuda" else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[choice]


def warmup_steps(cfg, max_steps: int) -> int:
    return int(cfg.warmup_ratio * max_steps) if cfg.warmup_ratio is not None else cfg.warmup_steps


def build_scheduler(optimizer: torch.optim.Optimizer, *, cfg, max_steps: int):
    """The lr schedule of the `schedule` group, stepped once per optimizer step.

    Args:
        optimizer: the optimizer whose lr it drives.
        cfg: the `schedule` config group.
        max_steps: optimizer steps in the run.
    """
    from transformers import get_scheduler

    warmup = warmup_steps(cfg, max_steps)
    if cfg.kind == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=max_steps,
                             scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})
    if cfg.kind == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    raise ValueError(f"schedule.kind={cfg.kind!r} is not supported")
