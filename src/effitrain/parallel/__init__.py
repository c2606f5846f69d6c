"""The `parallel` group: single, ddp, fsdp (ZeRO-3 / ZeRO-2), hsdp, tp and fsdp-tp layouts, with activation
checkpointing and regional compile.

Schemas, parallel degrees and checks here (no torch); builders in `effitrain.parallel.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("parallel", key="strategy", builders="effitrain.parallel.build")
FSDP_STRATEGIES = ("fsdp", "hsdp", "fsdp-tp")  # those that shard parameters with FSDP2
TP_STRATEGIES = ("tp", "fsdp-tp")


@dataclass
class ParallelBase:
    name: str = "single"
    strategy: str = "single"
    activation_checkpointing: str = "none"  # none | full | selective
    ac_every: int = 2  # selective: checkpoint every k-th block
    compile: bool = False  # torch.compile each transformer block


@GROUP.option("single")
@dataclass
class SingleParallel(ParallelBase):
    strategy: str = "single"


@GROUP.option("ddp")
@dataclass
class DDPParallel(ParallelBase):
    strategy: str = "ddp"


@dataclass
class ShardedBase(ParallelBase):
    reshard_after_forward: bool = True  # ZeRO-3 (True) or ZeRO-2 (False)
    offload: Optional[str] = None  # cpu = keep parameters, gradients and optimizer state on the host
    dp_shard: int = -1  # FSDP shard degree; -1 = whatever the world size leaves


@GROUP.option("fsdp")
@dataclass
class FSDPParallel(ShardedBase):
    strategy: str = "fsdp"


@GROUP.option("hsdp")
@dataclass
class HSDPParallel(ShardedBase):
    strategy: str = "hsdp"
    dp_replicate: int = 2  # replicas; dp_replicate x dp_shard = world size


@GROUP.option("tp")
@dataclass
class TPParallel(ParallelBase):
    strategy: str = "tp"
    tp: int = -1  # tensor-parallel degree; -1 = every rank
    sequence_parallel: bool = False


@GROUP.option("fsdp-tp")
@dataclass
class FSDPTPParallel(ShardedBase):
    strategy: str = "fsdp-tp"
    tp: int = 2
    sequence_parallel: bool = False


@GROUP.checks
def check(cfg) -> None:
    if cfg.activation_checkpointing not in ("none", "full", "selective"):
        raise UsageError(f"parallel.activation_checkpointing={cfg.activation_checkpointing!r} is not one of: "
                         "none, full, selective")
    if cfg.ac_every < 1:
        raise UsageError(f"parallel.ac_every={cfg.ac_every} must be >= 1")
    if cfg.strategy in FSDP_STRATEGIES and cfg.offload not in (None, "cpu"):
        raise UsageError(f"parallel.offload={cfg.offload!r} is not one of: null, cpu")


def offloads(cfg) -> bool:
    """True when FSDP keeps parameters, gradients and optimizer state on the host (the optimizer steps there)."""
    return cfg.strategy in FSDP_STRATEGIES and cfg.offload == "cpu"


@dataclass(frozen=True)
class Degrees:
    """How the world splits: data-parallel replicas x data-parallel shards x tensor-parallel ranks."""

    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def dp(self) -> int:
        """Data-parallel world size: ranks that read different batches."""
        return self.dp_replicate * self.dp_shard


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def parallel_degrees(cfg, *, world_size: int) -> Degrees:
    """The one place parallel degrees are checked against the world size (CLI and workers both call it)."""
    s = cfg.strategy
    _need(s != "single" or world_size == 1,
          f"parallel=single runs one process but the world size is {world_size}; "
          "choose parallel=ddp, fsdp, fsdp-zero2, hsdp, tp or fsdp-tp, or launcher.nproc_per_node=1")
    tp = 1
    if s in TP_STRATEGIES:
        tp = world_size if cfg.tp == -1 else cfg.tp
        _need(tp >= 1 and world_size % tp == 0,
              f"parallel.tp={cfg.tp} does not divide the world size {world_size} "
              "(launcher.nproc_per_node x launcher.nnodes); pick a divisor")
    _need(s != "tp" or tp == world_size,
          f"parallel=tp uses all {world_size} ranks for one tensor-parallel group but parallel.tp={tp}; "
          "use parallel=fsdp-tp for tensor x data parallel")
    dp = world_size // tp
    replicate = {"ddp": dp, "hsdp": cfg.dp_replicate if s == "hsdp" else 1}.get(s, 1)
    _need(replicate >= 1 and dp % replicate == 0,
          f"parallel.dp_replicate={replicate} does not divide the {dp} data-parallel ranks")
    shard = 1 if s in ("single", "ddp", "tp") else (dp // replicate if cfg.dp_shard == -1 else cfg.dp_shard)
    _need(replicate * shard == dp,
          f"parallel.dp_replicate={replicate} x parallel.dp_shard={shard} = {replicate * shard}, but the world "
          f"size {world_size} / parallel.tp={tp} leaves {dp} data-parallel ranks; make the product {dp}")
    return Degrees(dp_replicate=replicate, dp_shard=shard, tp=tp)
