"""The expert cache's bookkeeping: the ONE place where a policy is consulted.

``ExpertCacheState.route(event)`` turns one routing decision into a ``Plan``: which accesses hit, which experts
must be loaded into which slot (evicting whom), and which prefetches to issue. The engine executes plans with
real tensors and copies (moe_env.engine), the simulator with a time model (moe_env.sim), the env hands the
decisions to an agent (moe_env.env); all three share this class, so their counters agree on the same trace.

Semantics (per layer, ``capacity`` slots, empty at the start of each sequence):
- the event's experts are accessed in order; a hit is an access to a resident expert (an in-flight prefetch
  counts as resident: the driver waits for its copy, which shows up as stall time, not as a miss);
- a miss loads the expert into a free slot, else evicts the candidate with the lowest policy score; candidates
  exclude the event's own experts and experts still in flight (prefetched for this layer, not yet used); only if
  nothing else is left is an in-flight expert evicted (the driver waits for its copy before reusing the slot);
- ties in scores go to the least recently used, then to the lowest expert id;
- after the accesses the policy may prefetch ``(layer, expert)`` pairs for other layers; a prefetch never evicts
  an expert in flight nor one requested in the same call, and is dropped when the target layer has nothing
  evictable left.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from moe_env.policy import ModelSpec, OracleUnavailable, Policy, PolicyError, RouteEvent, validate_scores


class Oracle(Protocol):
    """The future, known in replay only (moe_env.sim provides it)."""

    def next_use(self, layer: int, expert: int, clock: int) -> float: ...

    def future_experts(self, step: int, layer: int) -> tuple[int, ...] | None: ...


@dataclass
class Counters:
    """Cache counters; decode accesses and prefill accesses are kept apart (headline metrics are decode)."""

    hits: int = 0
    misses: int = 0
    prefill_hits: int = 0
    prefill_misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    evictions: int = 0
    bytes_moved: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


@dataclass(frozen=True)
class Load:
    """Copy expert `expert` of `layer` into `slot`, replacing `evicted` (-1: the slot was free)."""

    layer: int
    expert: int
    slot: int
    evicted: int
    prefetch: bool


@dataclass
class Plan:
    """What the driver must do for one routed layer."""

    event: RouteEvent
    slots: list[int] = field(default_factory=list)  # slot of each of event.experts
    hit: list[bool] = field(default_factory=list)  # per access
    was_in_flight: list[bool] = field(default_factory=list)  # hit on an expert whose prefetch may still be copying
    loads: list[Load] = field(default_factory=list)  # demand loads, to be queued first
    prefetches: list[Load] = field(default_factory=list)  # prefetch loads, queued after the demand loads


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class _LayerPool:
    __slots__ = ("expert_in", "last_use", "loaded_at", "pending", "prefetched_unused", "slot_of", "use_count")

    def __init__(self, num_experts: int, capacity: int):
        self.slot_of = [-1] * num_experts
        self.expert_in = [-1] * capacity
        self.last_use = np.full(num_experts, -1, dtype=np.int64)
        self.use_count = np.zeros(num_experts, dtype=np.int64)
        self.loaded_at = np.full(num_experts, -1, dtype=np.int64)
        self.pending: set[int] = set()  # prefetched for this layer, not yet consumed by its acquire
        self.prefetched_unused: set[int] = set()


class ExpertCacheState:
    """Per-layer slot pools and counters; implements moe_env.policy.CacheView."""

    def __init__(self, spec: ModelSpec, capacity: int, policy: Policy, oracle: Oracle | None = None):
        if not 1 <= capacity <= spec.num_experts:
            raise ValueError(f"capacity {capacity} outside 1..{spec.num_experts} experts per layer")
        self.spec = spec
        self.capacity = capacity
        self.policy = policy
        self.oracle = oracle
        self.counters = Counters()
        self._clock = 0
        self._pools: list[_LayerPool] = []
        self.begin_sequence()

    # -- CacheView -------------------------------------------------------------------------------------------
    @property
    def clock(self) -> int:
        return self._clock

    def resident(self, layer: int) -> list[int]:
        return [e for e in self._pools[layer].expert_in if e >= 0]

    def is_resident(self, layer: int, expert: int) -> bool:
        return self._pools[layer].slot_of[expert] >= 0

    def slot_of(self, layer: int, expert: int) -> int:
        return self._pools[layer].slot_of[expert]

    def in_flight(self, layer: int) -> list[int]:
        return sorted(self._pools[layer].pending)

    # read-only views (O(1)): a plug-in that writes into them gets a ValueError instead of corrupting the cache
    def last_use(self, layer: int) -> np.ndarray:
        return _read_only(self._pools[layer].last_use)

    def use_count(self, layer: int) -> np.ndarray:
        return _read_only(self._pools[layer].use_count)

    def loaded_at(self, layer: int) -> np.ndarray:
        return _read_only(self._pools[layer].loaded_at)

    def next_use(self, layer: int, expert: int) -> float:
        if self.oracle is None:
            raise OracleUnavailable("next_use needs the future: only trace replay (sim, env) provides it")
        return self.oracle.next_use(layer, expert, self._clock)

    def future_experts(self, step: int, layer: int) -> tuple[int, ...] | None:
        if self.oracle is None:
            raise OracleUnavailable("future_experts needs the future: only trace replay (sim, env) provides it")
        return self.oracle.future_experts(step, layer)

    # -- sequence lifecycle ----------------------------------------------------------------------------------
    def begin_sequence(self) -> None:
        """Empty every pool (counting unused prefetches as wasted) and reset the policy."""
        self.finish()
        self._clock = 0
        self._pools = [_LayerPool(self.spec.num_experts, self.capacity) for _ in range(self.spec.num_layers)]
        self.policy.reset(self.spec, self.capacity)

    def finish(self) -> None:
        """Close the sequence's accounting: prefetched experts never used are wasted."""
        for pool in self._pools:
            self.counters.prefetch_wasted += len(pool.prefetched_unused)
            pool.prefetched_unused.clear()

    # -- the decision point ----------------------------------------------------------------------------------
    def route(self, event: RouteEvent) -> Plan:
        layer, experts = event.layer, event.experts
        self._check_event(event)
        pool = self._pools[layer]
        self.policy.observe(event, self)
        plan = Plan(event=event)
        protected = set(experts)
        prefill = event.prefill
        for expert in experts:
            self._clock += 1
            slot = pool.slot_of[expert]
            if slot >= 0:
                plan.hit.append(True)
                plan.was_in_flight.append(expert in pool.pending)
                if expert in pool.prefetched_unused:
                    pool.prefetched_unused.discard(expert)
                    self.counters.prefetch_used += 1
                if prefill:
                    self.counters.prefill_hits += 1
                else:
                    self.counters.hits += 1
            else:
                slot, evicted = self._make_room(layer, pool, protected, allow_in_flight=True)
                load = self._install(layer, pool, expert, slot, evicted, prefetch=False)
                plan.loads.append(load)
                plan.hit.append(False)
                plan.was_in_flight.append(False)
                if prefill:
                    self.counters.prefill_misses += 1
                else:
                    self.counters.misses += 1
            plan.slots.append(slot)
            pool.last_use[expert] = self._clock
            pool.use_count[expert] += 1
        pool.pending.clear()  # this layer's prefetches are consumed: the driver has waited for what it used
        self._issue_prefetches(event, plan)
        return plan

    def _check_event(self, event: RouteEvent) -> None:
        experts = event.experts
        if not 0 <= event.layer < self.spec.num_layers:
            raise ValueError(f"layer {event.layer} outside 0..{self.spec.num_layers - 1}")
        if len(experts) > self.capacity:
            raise ValueError(f"{len(experts)} experts routed at once but only {self.capacity} slots per layer")
        if len(set(experts)) != len(experts) or (
            experts and (min(experts) < 0 or max(experts) >= self.spec.num_experts)
        ):
            raise ValueError(f"bad expert list {experts} for {self.spec.num_experts} experts")

    def _make_room(self, layer: int, pool: _LayerPool, protected: set[int], allow_in_flight: bool) -> tuple[int, int]:
        """A free slot, or the policy's victim's slot: returns (slot, evicted expert or -1); (-1, -1) if none."""
        for slot, occupant in enumerate(pool.expert_in):
            if occupant < 0:
                return slot, -1
        candidates = [e for e in pool.expert_in if e not in protected and e not in pool.pending]
        if not candidates and allow_in_flight:
            candidates = [e for e in pool.expert_in if e not in protected]
        if not candidates:
            return -1, -1
        victim = self._choose_victim(layer, pool, np.asarray(sorted(candidates), dtype=np.int64))
        slot = pool.slot_of[victim]
        pool.slot_of[victim] = -1
        pool.expert_in[slot] = -1
        pool.loaded_at[victim] = -1
        pool.pending.discard(victim)
        if victim in pool.prefetched_unused:
            pool.prefetched_unused.discard(victim)
            self.counters.prefetch_wasted += 1
        self.counters.evictions += 1
        return slot, victim

    def _choose_victim(self, layer: int, pool: _LayerPool, candidates: np.ndarray) -> int:
        if len(candidates) == 1:
            # Still ask: stateful policies may track evictions; but the answer cannot change.
            validate_scores(self.policy.eviction_scores(layer, candidates, self), 1, self.policy)
            return int(candidates[0])
        scores = validate_scores(self.policy.eviction_scores(layer, candidates, self), len(candidates), self.policy)
        # lowest score first, then least recently used, then lowest expert id (plain Python: lexsort costs more
        # than the whole decision for a handful of candidates)
        ids = candidates.tolist()
        return min(zip(scores.tolist(), pool.last_use[candidates].tolist(), ids, strict=True))[2]

    def _install(self, layer: int, pool: _LayerPool, expert: int, slot: int, evicted: int, prefetch: bool) -> Load:
        pool.slot_of[expert] = slot
        pool.expert_in[slot] = expert
        pool.loaded_at[expert] = self._clock
        self.counters.bytes_moved += self.spec.expert_bytes
        return Load(layer=layer, expert=expert, slot=slot, evicted=evicted, prefetch=prefetch)

    def _issue_prefetches(self, event: RouteEvent, plan: Plan) -> None:
        requests = self.policy.prefetch(event, self)
        if not requests:
            return
        num_layers, num_experts = self.spec.num_layers, self.spec.num_experts
        pairs: list[tuple[int, int]] = []
        for request in requests:
            try:
                target_layer, expert = request
                target_layer, expert = int(target_layer), int(expert)
            except (TypeError, ValueError):
                raise PolicyError(
                    f"policy {self.policy.name!r} prefetch request {request!r} is not a (layer, expert) pair"
                ) from None
            if not (0 <= target_layer < num_layers and 0 <= expert < num_experts):
                raise PolicyError(
                    f"policy {self.policy.name!r} asked to prefetch expert {expert} of layer {target_layer}: "
                    f"out of range ({num_layers} layers, {num_experts} experts)"
                )
            pairs.append((target_layer, expert))
        # a prefetch never evicts an expert requested in the same call (it would evict what it asked for)
        requested: dict[int, set[int]] = {}
        for target_layer, expert in pairs:
            requested.setdefault(target_layer, set()).add(expert)
        for target_layer, expert in pairs:
            if target_layer == event.layer:
                continue  # this layer is already served; nothing to gain
            pool = self._pools[target_layer]
            if pool.slot_of[expert] >= 0:
                continue
            slot, evicted = self._make_room(target_layer, pool, requested[target_layer], allow_in_flight=False)
            if slot < 0:
                continue  # every slot of that layer holds an in-flight prefetch
            plan.prefetches.append(self._install(target_layer, pool, expert, slot, evicted, prefetch=True))
            pool.pending.add(expert)
            pool.prefetched_unused.add(expert)
            self.counters.prefetch_issued += 1


def chunk_experts(experts: list[int] | tuple[int, ...], capacity: int) -> list[tuple[int, ...]]:
    """Split a prefill layer's expert union (ascending) into groups that fit the pool, in order."""
    ordered = sorted(experts)
    return [tuple(ordered[i : i + capacity]) for i in range(0, len(ordered), capacity)]
