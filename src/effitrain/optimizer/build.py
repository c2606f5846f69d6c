"""Builders of the `optimizer` group: build_optimizer, and the OptimizerChain and state_bytes it relies on."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from effitrain.errors import UsageError
from effitrain.optimizer import GROUP

log = logging.getLogger("effitrain")


class OptimizerError(UsageError):
    """An impossible optimizer setting: reported as one line, exit code 2."""


def param_groups(model: nn.Module, *, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """Two groups: decayed weights, and the parameters no_decay names (bias, norm, embedding); empty ones dropped."""
    skip_ids = set()
    for module_name, module in model.named_modules():
        kind = ("embedding" if isinstance(module, nn.Embedding) else
                "norm" if "norm" in type(module).__name__.lower() or "ln" in module_name.split(".")[-1] else None)
        for name, p in module.named_parameters(recurse=False):
            if kind in no_decay or ("bias" in no_decay and name == "bias"):
                skip_ids.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in skip_ids], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in skip_ids], "weight_decay": 0.0}]
    # a foreach kernel takes plain tensors or DTensors, not both (expert parallelism's DTensor experts beside DDP's
    # plain replicas): each group split by that, in a group of its own only where the model mixes them
    groups = [g | {"params": [p for p in g["params"] if _is_dtensor(p) == dtensor]}
              for g in groups for dtensor in (False, True)]
    return [g for g in groups if g["params"]]


def _is_dtensor(p: torch.Tensor) -> bool:
    return hasattr(p, "device_mesh")


class OptimizerChain(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, seen as one by the loop, the loss scaler and the scheduler.

    The children's param_groups are the chain's own dicts (Optimizer.__init__ keeps the dicts it is given), so a
    scheduler writing `lr` into the chain's groups drives every child; and the children keep their per-parameter
    state in the chain's one `state` dict (their parameters are disjoint), so the chain's state_dict is the standard
    layout of a single optimizer, which torch.distributed.checkpoint's get/set_state_dict expect.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([g for o in optimizers for g in o.param_groups], {})
        self._share_state()

    def _share_state(self) -> None:
        groups = iter(self.param_groups)
        for optimizer in self.optimizers:
            optimizer.state = self.state
            optimizer.param_groups = [next(groups) for _ in optimizer.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new state and group dicts: hand them to the children
        self._share_state()


def build_optimizer(model: nn.Module, *, cfg, device: torch.device, param_dtype: str = "float32"
                    ) -> torch.optim.Optimizer:
    """The optimizer of the `optimizer` group; logs its state size per rank after the first step.

    bf16 parameters (precision=bf16-pure) get torchao's AdamW with bf16 stochastic rounding, so updates smaller
    than a bf16 ulp still move the weights on average.

    Args:
        model: the (possibly wrapped) model whose parameters train.
        cfg: the `optimizer` config group.
        device: where the parameters live (picks the fused/foreach implementation under `auto`).
        param_dtype: the precision's parameter dtype (precision.Spec.param; checks.check_traits made sure a
            bfloat16 one meets an optimizer with stochastic rounding).
    """
    groups = param_groups(model, weight_decay=cfg.weight_decay, no_decay=list(cfg.no_decay))
    optimizer = GROUP.builder_of(cfg.kind)(groups, model=model, cfg=cfg, device=device,
                                           bf16=param_dtype == "bfloat16")
    optimizer.register_step_post_hook(_log_state_once(cfg.name))
    return optimizer


@GROUP.builder("adamw")
def _adamw(groups, *, cfg, device, bf16, **_):
    if bf16:
        from torchao.optim import _AdamW

        return _AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, bf16_stochastic_round=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **_implementation(cfg.implementation, device))


@GROUP.builder("adamw-8bit")
def _adamw_8bit(groups, *, cfg, bf16, **_):
    from torchao.optim import AdamW8bit

    # torchao quantises state blockwise (256 values per fp32 scale); tensors under 4096 values stay fp32
    return AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, bf16_stochastic_round=bf16)


@GROUP.builder("sgd")
def _sgd(groups, *, cfg, device, **_):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           **_implementation(cfg.implementation, device))


@GROUP.builder("adafactor")
def _adafactor(groups, *, cfg, device, **_):
    foreach = _implementation(cfg.implementation, device).get("foreach", False)  # Adafactor has no fused kernel
    return torch.optim.Adafactor(groups, lr=cfg.lr, foreach=foreach)


@GROUP.builder("muon")
def _muon(groups, *, model, cfg, device, **_):
    """Muon (orthogonalised momentum) for hidden 2-D weights; AdamW for embeddings, LM head, norms and biases."""
    head_ids = {id(p) for name, m in model.named_modules() if isinstance(m, nn.Embedding) or name.endswith("lm_head")
                for p in m.parameters(recurse=False)}
    is_matrix = lambda p: p.ndim == 2 and id(p) not in head_ids  # noqa: E731
    split = lambda keep: [g | {"params": [p for p in g["params"] if keep(p)]} for g in groups]  # noqa: E731
    matrices = [g for g in split(is_matrix) if g["params"]]
    rest = [g for g in split(lambda p: not is_matrix(p)) if g["params"]]
    # match_rms_adamw scales Muon's update to AdamW's RMS, so one lr (and one schedule) serves both halves
    muon = torch.optim.Muon(matrices, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                            adjust_lr_fn="match_rms_adamw")
    return OptimizerChain([muon, _adamw(rest, cfg=cfg, device=device, bf16=False)])


@GROUP.builder("zero1")
def _zero1(groups, *, cfg, device, **_):
    """AdamW with its state sharded over the data-parallel ranks (ZeRO stage 1); needs parallel=ddp."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not dist.is_initialized():
        raise OptimizerError("optimizer=zero1 shards AdamW state over data-parallel ranks: it needs parallel=ddp "
                             "(a process group), not a single process")
    return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=cfg.lr, betas=tuple(cfg.betas),
                                   eps=cfg.eps, **_implementation(cfg.implementation, device))


def _implementation(choice: str, device: torch.device) -> dict:
    # fused kernels win on CUDA; on CPU the foreach (multi-tensor) path is the fast one
    if choice == "auto":
        choice = "fused" if device.type == "cuda" else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[choice]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by this rank (the local shard under zero1 / FSDP; packed 8-bit codes; an
    OptimizerChain's children keep theirs in its state)."""
    local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps this rank's shard in .optim
    return sum(_tensor_bytes(v) for s in local.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def _tensor_bytes(t: torch.Tensor) -> int:
    # tensor subclasses (DTensor shards, torchao's quantised states) hold their data in inner tensors
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, n) for n in names)  # may name non-tensors too (a DTensor's mesh, in some versions)
        return sum(_tensor_bytes(x) for x in inner if isinstance(x, torch.Tensor))
    return t.numel() * t.element_size()


def _log_state_once(name: str):
    # optimizers create their state lazily in the first step, so the size is known only after it
    def hook(optimizer, args, kwargs):
        if not getattr(optimizer, "_effitrain_state_logged", False):
            optimizer._effitrain_state_logged = True
            n = state_bytes(optimizer)
            log.info("optimizer %s: %.2f MiB of state on this rank (%d bytes)", name, n / 2**20, n)
    return hook


# ---------------------------------------------------------------- cost models (effitrain estimate)
# Cost models of the `optimizer` group (torch-free): the bytes of state each option keeps per rank, and whether

FP32 = 4


@dataclass(frozen=True)
class Cost:
    """An optimizer's memory on one rank.

    Args:
        state: `(node, params, numels, *, state_bytes, dp) -> bytes` of state for the rank's trained parameters
            (params: what the estimate knows of each (shape, kind); numels: this rank's elements of each;
            state_bytes: bytes per element of a full-precision moment, the precision's parameter bytes; dp: the
            data-parallel ranks).
        foreach_temporaries: an unfused (foreach) update builds about one fp32 temporary per parameter; torchao's
            per-tensor steps build none.
    """

    state: Callable[..., int]
    foreach_temporaries: bool = True


def _moments(count: int) -> Callable[..., int]:
    def state(node, params, numels, *, state_bytes: int, dp: int) -> int:
        return count * state_bytes * sum(numels)
    return state


def zero1_rank_loads(numels: list[int], ranks: int) -> list[int]:
    """ZeroRedundancyOptimizer's partition: parameters largest first, each to the least loaded rank."""
    loads = [0] * ranks
    for n in sorted(numels, reverse=True):
        loads[loads.index(min(loads))] += n
    return loads


def _zero1(node, params, numels, *, state_bytes: int, dp: int) -> int:
    """AdamW's two moments of whole tensors assigned to ranks greedily: the most loaded rank's."""
    return 2 * state_bytes * max(zero1_rank_loads(numels, dp))


def _adamw_8bit(node, params, numels, *, state_bytes: int, dp: int) -> int:
    # torchao: tensors of >= 4096 values in blockwise int8 (1 byte + one fp32 scale per 256) per moment
    return sum(2 * (n + FP32 * math.ceil(n / 256)) if n >= 4096 else 2 * state_bytes * n for n in numels)


def _sgd(node, params, numels, *, state_bytes: int, dp: int) -> int:
    return state_bytes * sum(numels) if node.momentum else 0


def _adafactor(node, params, numels, *, state_bytes: int, dp: int) -> int:
    # factored second moment of matrices: one value per row and per column; vectors keep a full one
    return sum(FP32 * (p.shape[0] + p.shape[1]) if len(p.shape) == 2 else FP32 * n
               for p, n in zip(params, numels, strict=True))


def _muon(node, params, numels, *, state_bytes: int, dp: int) -> int:
    # momentum for hidden matrices; AdamW's two moments for the rest
    return sum(FP32 * n if p.kind == "linear" and len(p.shape) == 2 else 2 * FP32 * n
               for p, n in zip(params, numels, strict=True))


GROUP.cost("adamw")(Cost(_moments(2)))
GROUP.cost("zero1")(Cost(_zero1))
GROUP.cost("adamw-8bit")(Cost(_adamw_8bit, foreach_temporaries=False))
GROUP.cost("sgd")(Cost(_sgd))
GROUP.cost("adafactor")(Cost(_adafactor))
GROUP.cost("muon")(Cost(_muon))


def temporaries(node, n_trained: int, *, cpu: bool) -> int:
    """Bytes the update builds on top of the state: foreach kernels ~one fp32 temporary per parameter; fused CUDA
    kernels (`auto` picks them off the CPU), the per-parameter loop and torchao's steps none."""
    implementation = node.get("implementation", "auto")
    fused = implementation in ("fused", "loop") or (implementation == "auto" and not cpu)
    return 0 if fused or not GROUP.cost_of(node.kind).foreach_temporaries else n_trained * FP32
