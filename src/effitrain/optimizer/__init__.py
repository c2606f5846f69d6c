"""The `optimizer` group: AdamW (fused/foreach), 8-bit AdamW, SGD, Adafactor, Muon, ZeRO-1 AdamW.

Schemas and checks here (no torch); builders in `effitrain.optimizer.build`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from effitrain.errors import UsageError
from effitrain.parallel import DDP, EXPERT_PARALLEL, WHOLE_WEIGHTS
from effitrain.registry import Group, Need

GROUP = Group("optimizer", key="kind", builders="effitrain.optimizer.build")
NO_DECAY = ("bias", "norm", "embedding")
IMPLEMENTATIONS = ("auto", "fused", "foreach", "loop")
STOCHASTIC_ROUNDING = "stochastic_rounding"  # trait: updates bf16 weights with stochastic rounding (torchao)


@dataclass
class OptimizerBase:
    name: str = "adamw"
    kind: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    no_decay: List[str] = field(default_factory=lambda: list(NO_DECAY))  # parameters kept out of weight decay


@dataclass
class AdamBase(OptimizerBase):
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@GROUP.option("adamw")
@dataclass
class AdamWOptimizer(AdamBase):
    kind: str = "adamw"
    implementation: str = "auto"  # auto (fused on CUDA, foreach on CPU) | fused | foreach | loop


@GROUP.option("adamw-8bit")
@dataclass
class AdamW8bitOptimizer(AdamBase):
    kind: str = "adamw-8bit"  # torchao's blockwise 8-bit state; its own kernels (no implementation choice)


@GROUP.option("zero1")
@dataclass
class Zero1Optimizer(AdamBase):
    kind: str = "zero1"  # AdamW with its state sharded over the DDP ranks
    implementation: str = "auto"


@GROUP.option("sgd")
@dataclass
class SGDOptimizer(OptimizerBase):
    kind: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    implementation: str = "auto"


@GROUP.option("adafactor")
@dataclass
class AdafactorOptimizer(OptimizerBase):
    kind: str = "adafactor"
    implementation: str = "auto"  # foreach or loop (Adafactor has no fused kernel)


@GROUP.option("muon")
@dataclass
class MuonOptimizer(AdamBase):
    kind: str = "muon"  # Muon for hidden matrices; AdamW (betas, eps) for the rest
    momentum: float = 0.95
    nesterov: bool = True
    implementation: str = "auto"  # the AdamW half's


GROUP.traits("adamw", provides=(STOCHASTIC_ROUNDING,))
GROUP.traits("adamw-8bit", provides=(STOCHASTIC_ROUNDING,))
GROUP.traits("zero1", needs=(Need(DDP, "ZeRO-1 shards AdamW state over DDP ranks (FSDP already shards optimizer "
                                      "state; use optimizer=adamw there)"),),
             # ZeRO-1 broadcasts each parameter from the rank that stepped it: it would overwrite each rank's experts
             excludes=(Need(EXPERT_PARALLEL, "under parallel.ep>1 ZeRO-1 would broadcast one rank's experts over the "
                                             "others' (use optimizer=adamw)"),))
GROUP.traits("sgd")
# Newton-Schulz orthogonalises whole matrices: sharded (FSDP/TP) weights would be orthogonalised per shard
GROUP.traits("muon", needs=(Need(WHOLE_WEIGHTS, "it needs whole weight matrices on each rank"),))
# its factored second moment reduces a shard's rows to a partial-norm DTensor that its in-place update cannot take
# (torch 2.13: "in-place operations that require placement changes are not supported", foreach and loop)
GROUP.traits("adafactor", needs=(Need(WHOLE_WEIGHTS, "torch's Adafactor fails on sharded (DTensor) parameters "
                                                     "(optimizer=adamw-8bit keeps optimizer state small under FSDP)"),))


@GROUP.checks
def check(cfg) -> None:
    if cfg.lr <= 0:
        raise UsageError(f"optimizer.lr={cfg.lr} must be > 0")
    if cfg.weight_decay < 0:
        raise UsageError(f"optimizer.weight_decay={cfg.weight_decay} must be >= 0")
    if "implementation" in cfg and cfg.implementation not in IMPLEMENTATIONS:
        raise UsageError(f"optimizer.implementation={cfg.implementation!r} is not one of: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    if cfg.kind == "adafactor" and cfg.implementation == "fused":
        raise UsageError("optimizer=adafactor has no fused kernel: optimizer.implementation=auto, foreach or loop")
    unknown = set(cfg.no_decay) - set(NO_DECAY)
    if unknown:
        raise UsageError(f"optimizer.no_decay has {sorted(unknown)}; allowed entries: {', '.join(NO_DECAY)}")
