"""Gradient compression: DDP communication hooks (torch.distributed.algorithms.ddp_comm_hooks) that shrink what each
rank all-reduces, with the bytes handed to all-reduce counted per step (the `comm_bytes_per_rank` metric). Two
methods: `grad_fp16` (gradients cast to fp16/bf16 for the all-reduce) and `grad_powersgd` (low-rank PowerSGD).

The count is the payload of the all-reduces the hook issues on this rank (a ring all-reduce then moves about twice
that over each link); under plain DDP it would be every gradient's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.base.converters import ModelConverter
from effitrain.compression.method import COMMUNICATION, GRADIENT_HOOK, GROUP, Cost
from effitrain.errors import UsageError
from effitrain.parallel import COMM_HOOKS
from effitrain.precision import CUDA
from effitrain.registry import Need


@GROUP.option("grad_fp16", order=COMMUNICATION)
@dataclass
class GradFP16:
    name: str = "grad-fp16"
    kind: str = "grad_fp16"
    dtype: str = "float16"  # float16 (any backend) or bfloat16 (CUDA + NCCL only)


@GROUP.option("grad_powersgd", order=COMMUNICATION + 1)
@dataclass
class GradPowerSGD:
    name: str = "grad-powersgd"
    kind: str = "grad_powersgd"
    rank: int = 2  # low-rank approximation rank of each gradient matrix
    start_iter: int = 10  # plain all-reduce before this step (PowerSGD's warm-up)
    error_feedback: bool = True  # carry each step's compression error into the next step
    warm_start: bool = True  # reuse last step's Q as the starting point of the power iteration
    min_compression_rate: float = 2.0  # matrices that would shrink less are all-reduced uncompressed


@GROUP.check_of("grad_fp16")
def check_fp16(node, cfg) -> None:
    if node.dtype not in ("float16", "bfloat16"):
        raise UsageError(f"compression.grad_fp16.dtype={node.dtype!r} is not one of: float16, bfloat16")


@GROUP.check_of("grad_powersgd")
def check_powersgd(node, cfg) -> None:
    k = "compression.grad_powersgd"
    if node.rank <= 0:
        raise UsageError(f"{k}.rank={node.rank} must be a positive integer")
    if node.start_iter < 2:
        raise UsageError(f"{k}.start_iter={node.start_iter} must be >= 2 (DDP rebuilds its buckets after step 1)")
    if node.min_compression_rate < 1:
        raise UsageError(f"{k}.min_compression_rate={node.min_compression_rate} must be >= 1")


ONE_HOOK = Need(GRADIENT_HOOK, "DDP takes one communication hook")


def _fp16_needs(node, cfg) -> list[Need]:
    needs = [Need(COMM_HOOKS, "it is a DDP communication hook (FSDP reduce-scatters in precision.reduce_dtype: use "
                              "precision=bf16 with parallel=fsdp for bf16 gradient reduction)")]
    if node.dtype == "bfloat16":
        needs.append(Need(CUDA, "with dtype=bfloat16 needs CUDA + NCCL: gloo cannot all-reduce bfloat16 buckets "
                                "(use compression.grad_fp16.dtype=float16)"))
    return needs


GROUP.traits("grad_fp16", provides=(GRADIENT_HOOK,), needs=_fp16_needs, excludes=(ONE_HOOK,))
GROUP.traits("grad_powersgd", provides=(GRADIENT_HOOK,), needs=(
    Need(COMM_HOOKS, "it is a DDP communication hook; FSDP/TP have no PowerSGD"),), excludes=(ONE_HOOK,))


class CommHook(ModelConverter):
    """Registers `hook` on the DDP model and counts the bytes each step's all-reduces carry.

    Args:
        hook: a DDP comm hook `(state, bucket) -> Future`.
        state: the hook's state (a process group or None for fp16/bf16, a PowerSGDState for PowerSGD).
        payload: `(state, bucket, call) -> bytes`: runs the hook (`call()`) and returns the bytes it all-reduced.
    """

    def __init__(self, hook, state, payload, *, serial_on_gloo: bool = False):
        self.hook, self.state, self.payload, self.serial_on_gloo = hook, state, payload, serial_on_gloo
        self.bytes = 0

    def comm_hook(self, model) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):  # the traits refuse other layouts before start
            raise UsageError("gradient compression hooks need parallel=ddp")

        # PowerSGD's callbacks wait inline on the next all-reduce (pytorch/pytorch#48478). On gloo they run on the
        # process group's few worker threads, so with several buckets in flight every worker can block and the
        # step hangs (seen here: ddp(2), 4 buckets, at the first compressed step). Finishing each bucket before
        # the next one starts keeps at most one callback waiting; it costs gloo runs the comm/compute overlap.
        serial = self.serial_on_gloo and dist.get_backend() == "gloo"

        def counted(state, bucket):
            future = None

            def call():
                nonlocal future
                future = self.hook(state, bucket)

            self.bytes += self.payload(state, bucket, call)
            if serial:
                future.wait()
            return future

        model.register_comm_hook(self.state, counted)

    def metrics(self) -> dict:
        sent, self.bytes = self.bytes, 0
        return {"comm_bytes_per_rank": sent}


def _cast_payload(bits: int):
    def payload(state, bucket, call) -> int:
        call()
        return bucket.buffer().numel() * bits // 8
    return payload


@GROUP.builder("grad_fp16")
def build_fp16(cfg, *, context) -> list[ModelConverter]:
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hook = default_hooks.fp16_compress_hook if cfg.dtype == "float16" else default_hooks.bf16_compress_hook
    return [CommHook(hook, None, _cast_payload(torch.finfo(getattr(torch, cfg.dtype)).bits))]


def _powersgd_payload(state, bucket, call) -> int:
    """Before start_iter the hook all-reduces the whole bucket; after, P and Q factors plus the tensors not worth
    compressing -- the hook's own element counters say how many (they grow as it sorts the bucket's tensors)."""
    vanilla = state.iter < state.start_powerSGD_iter
    before = state.total_numel_after_compression
    call()
    numel = bucket.buffer().numel() if vanilla else state.total_numel_after_compression - before
    return numel * bucket.buffer().element_size()


@GROUP.builder("grad_powersgd")
def build_powersgd(cfg, *, context) -> list[ModelConverter]:
    # the plain (per-tensor) hook: batched_powerSGD_hook asserts on torch 2.13 and compresses the whole bucket as
    # one matrix, which mixes unrelated layers
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.rank,
                                   start_powerSGD_iter=cfg.start_iter, min_compression_rate=cfg.min_compression_rate,
                                   use_error_feedback=cfg.error_feedback, warm_start=cfg.warm_start,
                                   random_seed=context.seed)
    return [CommHook(powersgd.powerSGD_hook, state, _powersgd_payload, serial_on_gloo=True)]


# nothing to count: the fp16/bf16 copy of a bucket lives while that bucket is all-reduced, well under the buckets
# themselves (the layout's ddp_buckets)
GROUP.cost("grad_fp16")(Cost())


def _error_feedback(node, inputs) -> dict[str, int]:
    # error feedback keeps one fp32 copy of the (trained) gradients
    return {"powersgd_error_feedback": inputs.trained * 4} if node.error_feedback else {}


GROUP.cost("grad_powersgd")(Cost(memory=_error_feedback, held=("powersgd_error_feedback",)))
