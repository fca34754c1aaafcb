"""What a router did in one forward pass, and how that becomes the cache's RouteEvents.

The engine produces a ``LayerRouting`` per MoE layer per forward pass (prefill: all prompt tokens; decode: one
token); traces store the same arrays; ``route_events`` turns either into the exact RouteEvent sequence that the
cache sees, so the engine and the simulator drive the cache identically.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moe_env.cache import chunk_experts
from moe_env.policy import RouteEvent


@dataclass
class LayerRouting:
    """Routing of one MoE layer over the tokens of one forward pass.

    experts [n, k] int (router order), weights [n, k] float32, gate_logits [n, E] float32 or None,
    lookahead_logits [n, E] float32 or None (next MoE layer's gate applied to this layer's input; None for the
    last layer or when absent). ``step`` is the decode step (0 = the forward that consumes the first generated
    token), -1 for prefill.
    """

    layer: int
    step: int
    experts: np.ndarray
    weights: np.ndarray | None = None
    gate_logits: np.ndarray | None = None
    lookahead_logits: np.ndarray | None = None
    token: int | str | None = None  # input token of this forward pass (decode): an id, or its text; None: unknown

    @property
    def prefill(self) -> bool:
        return self.step < 0


def _last(rows: np.ndarray | None) -> np.ndarray | None:
    return None if rows is None else rows[-1]


class PrefillLayout(Protocol):
    """How a prefill layer's expert union is grouped (moe_env.cache.ExpertCacheState.prefill_groups)."""

    def prefill_groups(self, layer: int, experts: list[int]) -> tuple[list[tuple[int, ...]], bool]: ...


def route_events(routing: LayerRouting, capacity: int | PrefillLayout) -> Iterator[RouteEvent]:
    """RouteEvents for one layer's forward pass.

    Decode (one token): one event with the experts in router order. Prefill: the union of the prompt's experts in
    ascending order, split into groups as `capacity` (the cache) says: groups of at most the layer's slots (each
    acquired, computed, then released), or one group that bypasses the cache; an int is a uniform chunk size.
    The last prompt token's logits are the signal.
    """
    experts = np.asarray(routing.experts)
    if not routing.prefill and experts.shape[0] == 1:
        yield RouteEvent(
            step=routing.step,
            layer=routing.layer,
            experts=tuple(experts[0].tolist()),  # Python ints, as the cache indexes lists with them
            weights=None if routing.weights is None else routing.weights[0],
            gate_logits=_last(routing.gate_logits),
            lookahead_logits=_last(routing.lookahead_logits),
            extra={} if routing.token is None else {"token": routing.token},
        )
        return
    union = sorted({int(e) for e in experts.reshape(-1)})
    if isinstance(capacity, int):
        groups, bypass = chunk_experts(union, capacity), False
    else:
        groups, bypass = capacity.prefill_groups(routing.layer, union)
    for group in groups:
        yield RouteEvent(
            step=routing.step,
            layer=routing.layer,
            experts=group,
            gate_logits=_last(routing.gate_logits),
            lookahead_logits=_last(routing.lookahead_logits),
            prefill=routing.prefill,
            bypass=bypass,
        )
