"""What a compression method declares, torch-free: the group it registers in, the traits the methods offer each
other, the stages their converters apply in, and the cost protocol the estimate reads.

A method is one module of this package (share_layers.py, lora.py, ...) that registers, on import:
- its schema and its stage: `@GROUP.option(kind, order=...)`;
- its checks against the run: `@GROUP.check_of(kind)`;
- its traits: `GROUP.traits(kind, provides=..., needs=..., excludes=...)`: the layouts, model or device it needs,
  what it does to the weights (the traits below), and what it cannot run beside (`excludes`, with the reason);
- its builder (its ModelConverters, base/converters.py), torch imported inside: `@GROUP.builder(kind)`;
- its cost model: `GROUP.cost(kind)(Cost(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from effitrain.registry import Group

GROUP = Group("compression", key="kind", builders="effitrain.compression.build", multi=True)

# The stages the methods' converters apply in, whatever the order the run lists them in: structure first (sharing),
# then what trains (freeze, adapters), then how weights are constrained (QAT, masks), then the loss, then
# communication. Within a stage a method's offset fixes its place (`@GROUP.option(kind, order=STAGE + i)`).
STRUCTURE, TRAINING, WEIGHTS, LOSS, COMMUNICATION = 100, 200, 300, 400, 500

# Traits a method provides to the other chosen options (and that others exclude, registry.Traits)
FREEZES = "freezes_weights"  # sets requires_grad False on some of the model's weights
FAKE_QUANTIZES = "fake_quantizes"  # swaps the block Linears for fake-quantized ones
MASKS = "masks_weights"  # keeps pruning masks on the block Linears' weights
GRADIENT_HOOK = "gradient_comm_hook"  # registers DDP's (one) communication hook


@dataclass(frozen=True)
class Inputs:
    """What a method's memory terms are computed from, per rank (estimate.py fills it).

    Args:
        params: the estimate's parameters (name, shape, kind, trainable, pruned), after every method's `params`.
        numels: this rank's elements of each (TP-split, FSDP-sharded).
        trained: this rank's elements of the trained parameters.
        param_bytes: bytes per parameter element (the precision's parameter dtype).
        shard: the ranks FSDP shards parameters over (1 without FSDP).
        vocab: the vocabulary size.
        tokens: tokens per micro-step and rank.
        read: what the method's `read` found when the model shape was built (None without one).
    """

    params: list
    numels: list[int]
    trained: int
    param_bytes: int
    shard: int
    vocab: int
    tokens: int
    read: object = None


@dataclass(frozen=True)
class Step:
    """Bytes the estimate's step holds that a method's own moment builds on (estimate.py fills it).

    Args:
        static: model states and every method's `held` items (0 when parallel.offload=cpu moves them to the host).
        activations: the saved activations (with the head's input).
        at_loss: FSDP's gathered parameters still held when the loss is computed (reshard_after_forward false).
    """

    static: int
    activations: int
    at_loss: int


@dataclass(frozen=True)
class Cost:
    """A compression method's cost model, read by `effitrain estimate` and the fit check; every hook is optional.

    Args:
        meta: `(model, node) -> model`: change the meta-built model as the method's converters would (which
            parameters exist, which train) before the estimate reads its parameters.
        params: `(model, params, node) -> params`: change the estimate's parameter list (adapters added, weights
            marked pruned); `dataclasses.replace` makes a changed or a new Param of one given.
        read: `(node, saved_params) -> value`: what the memory terms need that is read once per model shape (a
            teacher's size); `saved_params(path)` counts the parameters of a Hugging Face model directory or an
            effitrain run directory's model without loading it (the estimate's, which reads a run's saved config).
        memory: `(node, Inputs) -> {item: bytes}`: the memory items the method adds per rank.
        held: the items of `memory` held through the whole step (part of every moment).
        backward: the items of `memory` live from the loss to the end of backward.
        moments: `({item: bytes}, Inputs, Step) -> {moment: bytes}`: moments of the step the method adds (the peak
            is the largest of all moments).
    """

    meta: Callable | None = None
    params: Callable | None = None
    read: Callable | None = None
    memory: Callable | None = None
    held: tuple[str, ...] = ()
    backward: tuple[str, ...] = ()
    moments: Callable | None = None
