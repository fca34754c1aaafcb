"""One MoE layer's expert computation through the expert cache: route, queue copies, compute, accumulate.

``OffloadRuntime.forward_layer`` is what every OffloadedExperts module calls. Per layer and forward pass it
builds the LayerRouting (with the router's logits, captured by a forward hook, and the lookahead logits: the next
MoE layer's gate applied to this layer's input), hands it to the observers, then for each RouteEvent
(moe_env.routing.route_events: one per decode step, capacity-sized chunks in prefill) asks ExpertCacheState for a
Plan, queues its demand loads then its prefetches on the FIFO link, and computes each expert as soon as its copy
is ready. Contributions are added in ascending expert order, exactly as the family's eager ``Experts.forward``
does, so the output is bit-identical to the unmodified model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from moe_env.cache import ExpertCacheState, Plan
from moe_env.device_cache import SlotPools
from moe_env.models.base import ModelAdapter
from moe_env.models.offloaded import OffloadedExperts
from moe_env.routing import LayerRouting, route_events
from moe_env.store import HostExpertStore
from moe_env.transfer import CopyEngine, Ticket

RoutingObserver = Callable[[LayerRouting], None]


class OffloadRuntime:
    """Owns the cache state, the slot pools, the copy engine and the patched model's routing hooks."""

    def __init__(
        self,
        adapter: ModelAdapter,
        store: HostExpertStore,
        pools: SlotPools,
        cache_state: ExpertCacheState,
        copier: CopyEngine,
        keep_experts: bool = True,
    ):
        self.adapter = adapter
        self.store = store
        self.pools = pools
        self.cache_state = cache_state
        self.copier = copier
        self.keep_experts = keep_experts
        self.step = -1  # -1 while prefilling, then the decode step
        self.observers: list[RoutingObserver] = []
        num_layers, capacity = len(adapter.layers), pools.capacity
        self._tickets: list[list[Ticket | None]] = [[None] * capacity for _ in range(num_layers)]
        self._slot_read: list[list[torch.cuda.Event | None]] = [[None] * capacity for _ in range(num_layers)]
        self._gate_logits: list[torch.Tensor | None] = [None] * num_layers
        self._cuda = pools.device.type == "cuda"
        self._hooks = []

    # -- patching ----------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Swap every MoE block's experts for OffloadedExperts (dropping the fused weights) and hook the routers."""
        for layer in self.adapter.layers:
            offloaded = OffloadedExperts(layer.index, self.adapter.num_experts, layer.experts.act_fn, self)
            layer.block.experts = offloaded
            layer.experts = offloaded
            self._hooks.append(layer.router.register_forward_hook(self._capture_hook(layer.index)))

    def _capture_hook(self, layer: int) -> Callable[[nn.Module, tuple, tuple], None]:
        def capture(module: nn.Module, inputs: tuple, output: tuple) -> None:
            self._gate_logits[layer] = output[0]

        return capture

    def begin_sequence(self) -> None:
        """Empty the cache (physically too: the next copies overwrite slots, waiting on what is pending)."""
        self.cache_state.begin_sequence()
        self.step = -1

    # -- the per-layer work ------------------------------------------------------------------------------------
    def forward_layer(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        routing = self._routing(layer, hidden, top_k_index, top_k_weights)
        for observer in self.observers:
            observer(routing)

        num_experts = self.adapter.num_experts
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        contributions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for event in route_events(routing, self.cache_state):
            plan = self.cache_state.route(event)
            self._issue(plan)
            for expert, slot in self._ready_order(plan):
                self.copier.wait(self._tickets[layer][slot])
                token_idx, out = self._expert_output(layer, slot, expert, hidden, expert_mask, top_k_weights)
                contributions[expert] = (token_idx, out)
                if self._cuda:
                    read = torch.cuda.Event()
                    read.record(torch.cuda.current_stream(self.pools.device))
                    self._slot_read[layer][slot] = read

        final = torch.zeros_like(hidden)
        for expert in sorted(contributions):  # the eager forward's accumulation order: bitwise equal output
            token_idx, out = contributions[expert]
            final.index_add_(0, token_idx, out.to(final.dtype))
        if not self.keep_experts:
            self.cache_state.begin_sequence()  # no cache: the next access to any expert is a load
        return final

    def _routing(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> LayerRouting:
        layers = self.adapter.layers
        gate = self._gate_logits[layer]
        self._gate_logits[layer] = None
        lookahead = None
        if layer + 1 < len(layers):
            lookahead = self.adapter.raw_logits(layers[layer + 1].router, hidden.reshape(-1, hidden.shape[-1]))
        return LayerRouting(
            layer=layer,
            step=self.step,
            experts=top_k_index.detach().cpu().numpy().astype(np.int64),
            weights=top_k_weights.detach().float().cpu().numpy(),
            gate_logits=None if gate is None else gate.detach().float().cpu().numpy(),
            lookahead_logits=None if lookahead is None else lookahead.detach().cpu().numpy(),
        )

    def _issue(self, plan: Plan) -> None:
        """Queue demand loads, then prefetches (one FIFO link: demand copies are not stuck behind speculation)."""
        for load in (*plan.loads, *plan.prefetches):
            dst = self.pools.buffer(load.layer, load.slot)
            if self._cuda:
                src = self.store.source(load.layer, load.expert)  # pinned: an async copy on the side stream
            else:  # the copy thread reads the expert straight into the slot (a pread for the disk store)
                src = partial(self.store.read_into, load.layer, load.expert)
            after = self._slot_read[load.layer][load.slot]  # CUDA: the slot's last reader must finish first
            self._tickets[load.layer][load.slot] = self.copier.submit(dst, src, after)

    @staticmethod
    def _ready_order(plan: Plan) -> list[tuple[int, int]]:
        """(expert, slot) in the order copies complete on a FIFO link: resident hits, in-flight hits, loads."""
        ranked = []
        load_rank = {load.expert: i for i, load in enumerate(plan.loads)}
        for expert, slot, hit, in_flight in zip(
            plan.event.experts, plan.slots, plan.hit, plan.was_in_flight, strict=True
        ):
            rank = (0, 0) if hit and not in_flight else (1, 0) if hit else (2, load_rank[expert])
            ranked.append((rank, expert, slot))
        ranked.sort(key=lambda r: r[0])
        return [(expert, slot) for _, expert, slot in ranked]

    def _expert_output(
        self,
        layer: int,
        slot: int,
        expert: int,
        hidden: torch.Tensor,
        expert_mask: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager Experts.forward body for one expert, with weights read from its slot."""
        gate_up_proj, down_proj = self.pools.weights(layer, slot)
        act_fn = self.adapter.layers[layer].experts.act_fn
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        current_state = hidden[token_idx]
        gate, up = nn.functional.linear(current_state, gate_up_proj).chunk(2, dim=-1)
        current = act_fn(gate) * up
        current = nn.functional.linear(current, down_proj)
        current = current * top_k_weights[token_idx, top_k_pos, None]
        return token_idx, current

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.copier.close()
        self.store.close()
