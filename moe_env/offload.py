"""One MoE layer's expert computation through the expert cache: route, queue copies, compute, accumulate.

``OffloadRuntime.forward_layer`` is what every OffloadedExperts module calls. Per layer and forward pass it
builds the LayerRouting (with the router's logits, captured by a forward hook, and the lookahead logits: the next
MoE layer's gate applied to this layer's input), hands it to the observers, then for each RouteEvent
(moe_env.routing.route_events: one per decode step, capacity-sized chunks in prefill) asks ExpertCacheState for a
Plan, queues its demand loads then its prefetches on the FIFO link, and computes each expert as soon as its copy
is ready; prefill experts that bypass the cache are copied into scratch slots (two, double-buffered), computed
and forgotten. Contributions are added in ascending expert order, exactly as the family's eager
``Experts.forward`` does, so the output is bit-identical to the unmodified model.
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
        num_layers, allocation = len(adapter.layers), pools.allocation
        self._pool_of = allocation.layer_pool
        # per pool and slot: the copy writing it, and (CUDA) the last kernel reading it
        self._tickets: list[list[Ticket | None]] = [[None] * size for size in allocation.pool_slots]
        self._slot_read: list[list[torch.cuda.Event | None]] = [[None] * size for size in allocation.pool_slots]
        self._scratch_read: list[torch.cuda.Event | None] = [None] * pools.scratch_slots
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

    def begin_sequence(self, warm: bool = False) -> None:
        """Start a request. Cold: empty the cache (physically too: the next copies overwrite slots, waiting on
        what is pending). Warm: keep what is resident (its copies have landed or are tracked by their tickets)."""
        self.cache_state.begin_sequence(warm=warm)
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
        pool = self._pool_of[layer]
        for event in route_events(routing, self.cache_state):
            plan = self.cache_state.route(event)
            self._issue(plan)
            for expert, slot in self._ready_order(plan):
                self.copier.wait(self._tickets[pool][slot])
                weights = self.pools.weights(layer, slot)
                contributions[expert] = self._expert_output(layer, weights, expert, hidden, expert_mask, top_k_weights)
                self._slot_read[pool][slot] = self._record_read()
            if plan.bypass:
                self._stream_bypass(layer, plan.bypass, hidden, expert_mask, top_k_weights, contributions)

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

    def _record_read(self) -> torch.cuda.Event | None:
        """CUDA: an event after the kernels just queued that read a slot (its next copy must wait for them)."""
        if not self._cuda:
            return None
        read = torch.cuda.Event()
        read.record(torch.cuda.current_stream(self.pools.device))
        return read

    def _source(self, layer: int, expert: int):
        if self._cuda:
            return self.store.source(layer, expert)  # pinned: an async copy on the side stream
        return partial(self.store.read_into, layer, expert)  # the copy thread reads straight into the slot

    def _issue(self, plan: Plan) -> None:
        """Queue demand loads, then prefetches (one FIFO link: demand copies are not stuck behind speculation)."""
        for load in (*plan.loads, *plan.prefetches):
            pool = self._pool_of[load.layer]
            dst = self.pools.buffer(load.layer, load.slot)
            after = self._slot_read[pool][load.slot]  # CUDA: the slot's last reader must finish first
            self._tickets[pool][load.slot] = self.copier.submit(dst, self._source(load.layer, load.expert), after)

    def _stream_bypass(
        self,
        layer: int,
        experts: list[int],
        hidden: torch.Tensor,
        expert_mask: torch.Tensor,
        top_k_weights: torch.Tensor,
        contributions: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Prefill experts that are not installed: copy each into a scratch slot (the next copy overlaps this
        compute), compute it, reuse the slot. The cache's slots are untouched."""
        n = self.pools.scratch_slots
        tickets: list[Ticket | None] = [None] * n

        def submit(i: int) -> None:
            index = i % n
            dst = self.pools.scratch_buffer(index)
            tickets[index] = self.copier.submit(dst, self._source(layer, experts[i]), self._scratch_read[index])

        for i in range(min(n, len(experts))):
            submit(i)
        for i, expert in enumerate(experts):
            index = i % n
            self.copier.wait(tickets[index])
            weights = self.pools.scratch_weights(index)
            contributions[expert] = self._expert_output(layer, weights, expert, hidden, expert_mask, top_k_weights)
            self._scratch_read[index] = self._record_read()
            if i + n < len(experts):
                submit(i + n)

    @staticmethod
    def _ready_order(plan: Plan) -> list[tuple[int, int]]:
        """(expert, slot) in the order copies complete on a FIFO link: resident hits, in-flight hits, loads."""
        ranked = []
        load_rank = {load.expert: i for i, load in enumerate(plan.loads)}
        for expert, slot, hit, in_flight in zip(
            plan.event.experts, plan.slots, plan.hit, plan.was_in_flight, strict=True
        ):
            if slot < 0:
                continue  # bypassed: streamed through a scratch slot
            rank = (0, 0) if hit and not in_flight else (1, 0) if hit else (2, load_rank[expert])
            ranked.append((rank, expert, slot))
        ranked.sort(key=lambda r: r[0])
        return [(expert, slot) for _, expert, slot in ranked]

    def _expert_output(
        self,
        layer: int,
        weights: tuple[torch.Tensor, torch.Tensor],
        expert: int,
        hidden: torch.Tensor,
        expert_mask: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager Experts.forward body for one expert, with weights read from its slot."""
        gate_up_proj, down_proj = weights
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
