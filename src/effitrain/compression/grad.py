"""Gradient compression: DDP communication hooks (torch.distributed.algorithms.ddp_comm_hooks) that shrink what each
rank all-reduces, with the bytes handed to all-reduce counted per step (the `comm_bytes_per_rank` metric).

The count is the payload of the all-reduces the hook issues on this rank (a ring all-reduce then moves about twice
that over each link); under plain DDP it would be every gradient's bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from effitrain.compression import GROUP
from effitrain.engine.converters import ModelConverter
from effitrain.errors import UsageError


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

    def comm_hook(self, model: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):  # checks.py refuses other layouts before start
            raise UsageError("gradient compression hooks need parallel=ddp")

        import torch.distributed as dist

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


def _cast_payload(dtype: torch.dtype):
    def payload(state, bucket, call) -> int:
        call()
        return bucket.buffer().numel() * torch.finfo(dtype).bits // 8
    return payload


@GROUP.builder("grad_fp16")
def grad_fp16(cfg, *, context) -> list[ModelConverter]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hook = default_hooks.fp16_compress_hook if cfg.dtype == "float16" else default_hooks.bf16_compress_hook
    return [CommHook(hook, None, _cast_payload(getattr(torch, cfg.dtype)))]


def _powersgd_payload(state, bucket, call) -> int:
    """Before start_iter the hook all-reduces the whole bucket; after, P and Q factors plus the tensors not worth
    compressing -- the hook's own element counters say how many (they grow as it sorts the bucket's tensors)."""
    vanilla = state.iter < state.start_powerSGD_iter
    before = state.total_numel_after_compression
    call()
    numel = bucket.buffer().numel() if vanilla else state.total_numel_after_compression - before
    return numel * bucket.buffer().element_size()


@GROUP.builder("grad_powersgd")
def grad_powersgd(cfg, *, context) -> list[ModelConverter]:
    # the plain (per-tensor) hook: batched_powerSGD_hook asserts on torch 2.13 and compresses the whole bucket as
    # one matrix, which mixes unrelated layers
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.rank,
                                   start_powerSGD_iter=cfg.start_iter, min_compression_rate=cfg.min_compression_rate,
                                   use_error_feedback=cfg.error_feedback, warm_start=cfg.warm_start,
                                   random_seed=context.seed)
    return [CommHook(powersgd.powerSGD_hook, state, _powersgd_payload, serial_on_gloo=True)]
