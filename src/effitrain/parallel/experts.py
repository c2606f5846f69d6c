"""Expert parallelism (`parallel.ep=N`): each rank holds num_experts/N whole experts of every mixture-of-experts layer,
and each (token, expert) pair travels to its expert's rank and back by all-to-all.

transformers does the sharding and the exchange from the family's own `base_model_ep_plan`
(transformers.distributed.expert_parallel): "grouped_gemm" makes each experts tensor ([experts, ...]) a DTensor
Shard(0) over the EP mesh, "ep_dispatch_experts" sends the pairs with one `all_to_all_single` of the counts, one of
the tokens, and brings the outputs back with a third (AllToAllEP; differentiable, so backward moves the gradients
the other way; gloo supports it on CPU tensors, uneven splits included). What effitrain adds:
- the data-parallel mean of the expert gradients, summed over replicas of an expert when ep < world
  (`Experts.average_grads`);
- the bytes the all-to-alls move (`counted_all_to_all`, read by engine.loop.RouterLoad as `a2a_bytes_per_rank`).
The experts stay DTensors, so a DCP checkpoint saves each rank's experts under the whole model's names (resume
and export see the whole model) and the optimizer steps them like any other parameter.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

EP_IMPLEMENTATION = "effitrain_counted_all_to_all"


@dataclass
class Experts:
    """The sharded experts of a model: their parameters (for the data-parallel wrapper to leave alone) and the group
    of ranks holding the same experts (one per EP group: world / ep of them; None when ep = world)."""

    params: set
    replicas: object | None

    def average_grads(self, model: nn.Module, *, dp: int) -> None:
        """Each expert's gradient as the data-parallel mean, once the parameters are materialised (hooks on meta ones
        would not survive). On its rank an expert's gradient already sums what every token of its EP group
        contributed (their outputs came back through the all-to-all), so it is not all-reduced over the EP group as
        replicated parameters are: summed over the replicas' groups (ep < world), then scaled by 1/dp, the mean that
        DDP's and FSDP's averaging gives every other parameter."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        def average(grad):
            local = grad.to_local().clone()
            if self.replicas is not None:
                dist.all_reduce(local, group=self.replicas)
            return DTensor.from_local(local / dp, grad.device_mesh, grad.placements, run_check=False)

        for name, p in model.named_parameters():  # by name: materialising may have replaced the objects
            if _is_expert(name):
                p.register_hook(average)


def apply_ep(model: nn.Module, *, ep: int, device: torch.device) -> Experts:
    """Shard the experts of every MoE layer over groups of `ep` consecutive ranks by the family's base_model_ep_plan
    (each group holds every expert once).

    Args:
        model: the causal LM, before any data-parallel wrapping (parameters real or on the meta device).
        ep: the expert-parallel degree (checked: it divides the experts and the data-parallel ranks).
        device: the run's device (its type names the mesh's backend).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import EPImplementationInterface, apply_expert_parallelism

    EPImplementationInterface.register(EP_IMPLEMENTATION, counted_all_to_all)
    # "batch": the ranks that hold the same tokens (transformers' tp_mesh): none here, each rank reads its own batch
    replicas = dist.get_world_size() // ep
    mesh = init_device_mesh(device.type, (replicas, ep, 1), mesh_dim_names=("replicas", "ep", "batch"))
    apply_expert_parallelism(model, mesh["ep"], mesh["batch"], _plan(model), EP_IMPLEMENTATION)
    return Experts(params={p for name, p in model.named_parameters() if _is_expert(name)},
                   replicas=mesh["replicas"].get_group() if replicas > 1 else None)


def hide_from_ddp(model: nn.Module) -> None:
    """Each rank's experts are its own: DDP (wrapping `model` next) must neither check them equal across ranks nor
    all-reduce their gradients."""
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, _ in model.named_parameters() if _is_expert(name)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def _is_expert(name: str) -> bool:
    return ".experts." in f".{name}"


def _plan(model: nn.Module) -> dict[str, str]:
    """The family's base_model_ep_plan ("layers.*.mlp.experts": style, ...) on this model's module and parameter
    names (under its base model's prefix)."""
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    plan = {}
    for pattern, style in model.config.base_model_ep_plan.items():
        regex = re.compile(re.escape(f"{model.base_model_prefix}.{pattern}").replace(r"\*", r"\d+"))
        found = [n for n in names if regex.fullmatch(n)]
        if not found:  # a plan that names nothing of the model would leave its experts whole on every rank
            raise RuntimeError(f"base_model_ep_plan entry {pattern!r} matches no module of the model")
        plan |= dict.fromkeys(found, style)
    return plan


@functools.cache
def _counted():
    """transformers' AllToAllEP, counting the bytes it sends to other ranks (defined on first use: transformers'
    distributed module imports only where torch.distributed is available)."""
    from transformers.distributed.expert_parallel import AllToAllEP

    class Counted(AllToAllEP):
        """AllToAllEP that adds up the bytes this rank sends to the other ranks of its EP group: the counts, the
        tokens (dispatch), the expert outputs (combine) and, in backward, the same rows the other way."""

        def __init__(self, experts, ep_mesh, tp_mesh):
            super().__init__(experts, ep_mesh, tp_mesh)
            self.sent = 0
            experts.a2a = self  # where RouterLoad finds the counter

        def _dispatch_tokens(self, hidden_states, top_k_index, top_k_weights):
            tokens, expert_ids, weights, state = super()._dispatch_tokens(hidden_states, top_k_index, top_k_weights)
            me, size = self.ep_mesh.get_local_rank(), self.ep_mesh.size()
            # rows for this rank's own experts stay local: only the others cross a link
            rows = sum(state.send_sizes) - state.send_sizes[me] + sum(state.recv_sizes) - state.recv_sizes[me]
            moved = rows * hidden_states.shape[-1] * hidden_states.element_size()
            self.sent += moved + (size - 1) * self.num_local_experts * 8  # + the int64 counts
            if tokens.requires_grad:  # reached in backward between the combine's and the dispatch's all-to-all
                tokens.register_hook(lambda _grad: self._add(moved))
            return tokens, expert_ids, weights, state

        def _add(self, moved: int) -> None:
            self.sent += moved

        def take(self) -> int:
            sent, self.sent = self.sent, 0
            return sent

    return Counted


def counted_all_to_all(experts, ep_mesh, tp_mesh):
    """transformers' AllToAllEP with a byte counter, for one experts module (EPImplementationInterface calls it)."""
    return _counted()(experts, ep_mesh, tp_mesh)


def a2a_counters(model: nn.Module) -> list:
    """The byte counters of the model's expert-parallel layers (empty without expert parallelism)."""
    return [m.a2a for m in model.modules() if hasattr(m, "a2a")]
