"""The expert cache's bookkeeping: the ONE place where a policy is consulted.

``ExpertCacheState.route(event)`` turns one routing decision into a ``Plan``: which accesses hit, which experts
must be loaded into which slot (evicting whom), and which prefetches to issue. The engine executes plans with
real tensors and copies (moe_env.engine), the simulator with a time model (moe_env.sim), the env hands the
decisions to an agent (moe_env.env); all three share this class, so their counters agree on the same trace.

Layout (moe_env.allocation.Allocation): slot pools, each serving one layer (uniform, profile) or every layer
(shared). Semantics:
- the event's experts are accessed in order; a hit is an access to a resident expert (an in-flight prefetch
  counts as resident: the driver waits for its copy, which shows up as stall time, not as a miss);
- a miss loads the expert into a free slot of its layer's pool, else evicts the candidate with the lowest policy
  score among the pool's residents (every layer's, in a shared pool); candidates exclude the event's own experts
  and experts still in flight (prefetched, not yet used by their layer); only if nothing else is left is an
  in-flight expert evicted (the driver waits for its copy before reusing the slot);
- ties in scores go to the least recently used, then to the lowest (layer, expert);
- after the accesses the policy may prefetch ``(layer, expert)`` pairs for other layers; a prefetch never evicts
  an expert in flight nor one requested in the same call, and is dropped when the target pool has nothing
  evictable left;
- a prefill event marked ``bypass`` (prefill mode ``bypass``: the layer's prompt experts exceed its share of the
  budget) installs nothing: resident experts are hits, the others are computed from copies that are not kept;
- ``begin_sequence(warm=True)`` keeps the residents, the clock and the policy's persistent state between
  requests; cold (the default) empties everything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from moe_env.allocation import Allocation
from moe_env.errors import UsageError
from moe_env.policy import (
    CombinedPolicy,
    ModelSpec,
    OracleUnavailable,
    Policy,
    PolicyError,
    RouteEvent,
    validate_scores,
)

PREFILL_MODES = ("chunked", "bypass")
FIRST_TOKENS = 8  # decode steps counted apart after each prefill: how well the decode working set survived it


class Oracle(Protocol):
    """The future, known in replay only (moe_env.sim provides it)."""

    def next_use(self, layer: int, expert: int, clock: int) -> float: ...

    def future_experts(self, step: int, layer: int) -> tuple[int, ...] | None: ...


@dataclass
class Counters:
    """Cache counters; decode accesses and prefill accesses are kept apart (headline metrics are decode).

    ``first_hits``/``first_misses``: decode accesses of the first FIRST_TOKENS steps of each sequence (included in
    hits/misses). ``bypass_loads``: prefill misses served from a copy that was not installed (also prefill misses).
    """

    hits: int = 0
    misses: int = 0
    prefill_hits: int = 0
    prefill_misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    first_hits: int = 0
    first_misses: int = 0
    bypass_loads: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def first_hit_rate(self) -> float:
        total = self.first_hits + self.first_misses
        return self.first_hits / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["first_hit_rate"] = self.first_hit_rate
        return d


@dataclass(frozen=True)
class Load:
    """Copy expert `expert` of `layer` into `slot` of the layer's pool, replacing `evicted` of `evicted_layer`
    (-1: the slot was free)."""

    layer: int
    expert: int
    slot: int
    evicted: int
    prefetch: bool
    evicted_layer: int = -1


@dataclass
class Plan:
    """What the driver must do for one routed layer."""

    event: RouteEvent
    slots: list[int] = field(default_factory=list)  # slot of each of event.experts (-1: bypassed)
    hit: list[bool] = field(default_factory=list)  # per access
    was_in_flight: list[bool] = field(default_factory=list)  # hit on an expert whose prefetch may still be copying
    loads: list[Load] = field(default_factory=list)  # demand loads, to be queued first
    prefetches: list[Load] = field(default_factory=list)  # prefetch loads, queued after the demand loads
    bypass: list[int] = field(default_factory=list)  # experts to compute from a copy that is not installed


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class _Pool:
    """Slots shared by `layers`; a slot holds the key layer * E + expert (-1: free)."""

    __slots__ = ("filled", "key_in", "layers", "size")

    def __init__(self, size: int, layers: tuple[int, ...]):
        self.size = size
        self.layers = layers
        self.key_in = [-1] * size
        self.filled = 0  # slots 0..filled-1 are taken (a slot is freed only by emptying the whole cache)


class ExpertCacheState:
    """Slot pools and counters; implements moe_env.policy.CacheView.

    ``capacity``: an int (that many slots per layer, uniform) or an Allocation. ``prefill``: "chunked" (the
    prompt's experts go through the cache in pool-sized chunks) or "bypass".
    """

    def __init__(
        self,
        spec: ModelSpec,
        capacity: int | Allocation,
        policy: Policy,
        oracle: Oracle | None = None,
        prefill: str = "chunked",
    ):
        if isinstance(capacity, Allocation):
            allocation = capacity
        else:
            if not 1 <= capacity <= spec.num_experts:
                raise ValueError(f"capacity {capacity} outside 1..{spec.num_experts} experts per layer")
            allocation = Allocation.uniform(spec.num_layers, spec.num_experts, capacity)
        if allocation.num_layers != spec.num_layers or allocation.num_experts != spec.num_experts:
            raise ValueError(f"allocation for {allocation.num_layers} layers x {allocation.num_experts} experts, "
                             f"model has {spec.num_layers} x {spec.num_experts}")  # fmt: skip
        if prefill not in PREFILL_MODES:
            raise UsageError(f"unknown prefill mode {prefill!r}; use one of {', '.join(PREFILL_MODES)}")
        if allocation.shared and not policy.ranks_across_layers:
            raise UsageError(
                f"policy {policy.name!r} does not rank victims across layers (ranks_across_layers is False): "
                "use it with allocation uniform or profile"
            )
        self.spec = spec
        self.allocation = allocation
        self.capacity = max(allocation.layer_slots(layer) for layer in range(spec.num_layers))
        self.prefill = prefill
        self.policy = policy
        self.oracle = oracle
        self.counters = Counters()
        self._layer_slots = [allocation.layer_slots(layer) for layer in range(spec.num_layers)]
        self._bypass_above = [allocation.share(layer) for layer in range(spec.num_layers)]
        self._clock = 0
        self._started = False
        self._prefetched_unused: list[set[int]] = []
        self.begin_sequence()

    # -- CacheView -------------------------------------------------------------------------------------------
    @property
    def clock(self) -> int:
        return self._clock

    def layer_capacity(self, layer: int) -> int:
        """The most experts of `layer` that can be resident at once (its pool's slots, at most all experts)."""
        return self._layer_slots[layer]

    def resident(self, layer: int) -> list[int]:
        pool = self._pool_of[layer]
        base, top = layer * self.spec.num_experts, (layer + 1) * self.spec.num_experts
        return [key - base for key in pool.key_in if base <= key < top]

    def is_resident(self, layer: int, expert: int) -> bool:
        return self._slot_of[layer][expert] >= 0

    def slot_of(self, layer: int, expert: int) -> int:
        return self._slot_of[layer][expert]

    def pool_index(self, layer: int) -> int:
        """The pool whose slots `layer` uses (drivers index their slot tensors by it)."""
        return self.allocation.layer_pool[layer]

    def in_flight(self, layer: int) -> list[int]:
        return sorted(self._pending[layer])

    # rows of read-only views made once per sequence: a plug-in that writes into them gets a ValueError instead of
    # corrupting the cache, at the cost of a row view as before (setting the flag per call costs ~2.5 us)
    def last_use(self, layer: int) -> np.ndarray:
        return self._read_only_views[0][layer]

    def use_count(self, layer: int) -> np.ndarray:
        return self._read_only_views[1][layer]

    def loaded_at(self, layer: int) -> np.ndarray:
        return self._read_only_views[2][layer]

    def next_use(self, layer: int, expert: int) -> float:
        if self.oracle is None:
            raise OracleUnavailable("next_use needs the future: only trace replay (sim, env) provides it")
        return self.oracle.next_use(layer, expert, self._clock)

    def future_experts(self, step: int, layer: int) -> tuple[int, ...] | None:
        if self.oracle is None:
            raise OracleUnavailable("future_experts needs the future: only trace replay (sim, env) provides it")
        return self.oracle.future_experts(step, layer)

    # -- sequence lifecycle ----------------------------------------------------------------------------------
    def begin_sequence(self, warm: bool = False) -> None:
        """Start a request. Cold: empty every pool (counting unused prefetches as wasted), restart the clock and
        reset the policy's persistent state. Warm: keep residents, clock and persistent state. Either way the
        policy's per-sequence state starts afresh (Policy.begin_sequence)."""
        self.finish()
        if not (warm and self._started):
            self._empty()
            self.policy.reset(self.spec, self.capacity)
        self._started = True
        # hooks the plug-in leaves at the base class's no-op are not called per event (same decisions, less work)
        self._observes, self._prefetches = (_overrides(self.policy, hook) for hook in ("observe", "prefetch"))
        self.policy.begin_sequence(self)

    def _empty(self) -> None:
        spec, allocation = self.spec, self.allocation
        self._clock = 0
        self._pools = [
            _Pool(size, tuple(layer for layer, pool in enumerate(allocation.layer_pool) if pool == index))
            for index, size in enumerate(allocation.pool_slots)
        ]
        self._pool_of = [self._pools[p] for p in allocation.layer_pool]
        self._slot_of = [[-1] * spec.num_experts for _ in range(spec.num_layers)]
        self._last_use = np.full((spec.num_layers, spec.num_experts), -1, dtype=np.int64)
        self._use_count = np.zeros((spec.num_layers, spec.num_experts), dtype=np.int64)
        self._loaded_at = np.full((spec.num_layers, spec.num_experts), -1, dtype=np.int64)
        self._read_only_views = tuple(_read_only(a) for a in (self._last_use, self._use_count, self._loaded_at))
        self._pending: list[set[int]] = [set() for _ in range(spec.num_layers)]  # prefetched, not yet used
        self._prefetched_unused = [set() for _ in range(spec.num_layers)]

    def finish(self) -> None:
        """Close the sequence's accounting: prefetched experts not used so far are wasted (warm: a later hit on
        one of them is a plain hit)."""
        for unused in self._prefetched_unused:
            self.counters.prefetch_wasted += len(unused)
            unused.clear()

    # -- prefill chunking --------------------------------------------------------------------------------------
    def prefill_groups(self, layer: int, experts: list[int] | tuple[int, ...]) -> tuple[list[tuple[int, ...]], bool]:
        """How a prefill layer's expert union is routed: (groups in order, bypass). Chunked: ascending groups of at
        most the layer's slots. Bypass: one group, not installed, when the union exceeds the layer's share."""
        if self.prefill == "bypass" and len(experts) > self._bypass_above[layer]:
            return [tuple(sorted(experts))], True
        return chunk_experts(experts, self._layer_slots[layer]), False

    # -- the decision point ----------------------------------------------------------------------------------
    def route(self, event: RouteEvent) -> Plan:
        layer, experts = event.layer, event.experts
        self._check_event(event)
        if self._observes:
            self.policy.observe(event, self)
        plan = Plan(event=event)
        slots, hit, was_in_flight = plan.slots, plan.hit, plan.was_in_flight
        slot_of, pending, unused = self._slot_of[layer], self._pending[layer], self._prefetched_unused[layer]
        last_use, use_count = self._last_use[layer], self._use_count[layer]
        counters = self.counters
        prefill, bypass = event.prefill, event.bypass
        clock = self._clock
        hits = misses = 0  # this event's, added to the counters once
        protected: dict[int, set[int]] | None = None
        for expert in experts:
            clock += 1
            slot = slot_of[expert]
            if slot >= 0:
                hits += 1
                hit.append(True)
                was_in_flight.append(expert in pending)
                if expert in unused:
                    unused.discard(expert)
                    counters.prefetch_used += 1
            elif bypass:
                misses += 1
                hit.append(False)
                was_in_flight.append(False)
                plan.bypass.append(expert)
                counters.bypass_loads += 1
                counters.bytes_moved += self.spec.expert_bytes
            else:
                misses += 1
                if protected is None:
                    protected = {layer: set(experts)}
                self._clock = clock  # the victim's scores and the load time see this access's clock
                slot, evicted, evicted_layer = self._make_room(layer, protected, allow_in_flight=True)
                plan.loads.append(self._install(layer, expert, slot, evicted, evicted_layer, prefetch=False))
                hit.append(False)
                was_in_flight.append(False)
            slots.append(slot)
            last_use[expert] = clock
            use_count[expert] += 1
        self._clock = clock
        if prefill:
            counters.prefill_hits += hits
            counters.prefill_misses += misses
        else:
            counters.hits += hits
            counters.misses += misses
            if event.step < FIRST_TOKENS:
                counters.first_hits += hits
                counters.first_misses += misses
        pending.clear()  # this layer's prefetches are consumed: the driver has waited for what it used
        if self._prefetches:
            self._issue_prefetches(event, plan)
        return plan

    def _check_event(self, event: RouteEvent) -> None:
        experts = event.experts
        if not 0 <= event.layer < self.spec.num_layers:
            raise ValueError(f"layer {event.layer} outside 0..{self.spec.num_layers - 1}")
        if event.bypass and not event.prefill:
            raise ValueError("only a prefill event can bypass the cache")
        if len(experts) > self._layer_slots[event.layer] and not event.bypass:
            raise ValueError(
                f"{len(experts)} experts routed at once but layer {event.layer} holds {self._layer_slots[event.layer]}"
            )
        if len(set(experts)) != len(experts) or (
            experts and (min(experts) < 0 or max(experts) >= self.spec.num_experts)
        ):
            raise ValueError(f"bad expert list {experts} for {self.spec.num_experts} experts")

    def _make_room(self, layer: int, protected: dict[int, set[int]], allow_in_flight: bool) -> tuple[int, int, int]:
        """A free slot of the layer's pool, or the policy's victim's slot: (slot, evicted expert or -1, its layer);
        (-1, -1, -1) if nothing may be evicted. A per-layer pool never leaves the layer's own experts."""
        pool = self._pool_of[layer]
        if pool.filled < pool.size:
            slot = pool.filled
            pool.filled += 1
            return slot, -1, -1
        if len(pool.layers) == 1:
            victim_layer, victim = layer, self._victim_in_layer(layer, pool, protected.get(layer, ()), allow_in_flight)
        else:
            victim_layer, victim = self._victim_across(pool, protected, allow_in_flight)
        if victim < 0:
            return -1, -1, -1
        slot = self._slot_of[victim_layer][victim]
        self._slot_of[victim_layer][victim] = -1
        pool.key_in[slot] = -1
        self._loaded_at[victim_layer][victim] = -1
        self._pending[victim_layer].discard(victim)
        unused = self._prefetched_unused[victim_layer]
        if victim in unused:
            unused.discard(victim)
            self.counters.prefetch_wasted += 1
        self.counters.evictions += 1
        return slot, victim, victim_layer

    def _victim_in_layer(self, layer: int, pool: _Pool, protected, allow_in_flight: bool) -> int:
        base = layer * self.spec.num_experts
        pending = self._pending[layer]
        if pending:
            residents = [key - base for key in pool.key_in]
            candidates = [e for e in residents if e not in protected and e not in pending]
            if not candidates and allow_in_flight:
                candidates = [e for e in residents if e not in protected]
            candidates.sort()
        else:  # nothing in flight (every demand-only run): one pass
            candidates = sorted(e for e in (key - base for key in pool.key_in) if e not in protected)
        if not candidates:
            return -1
        ids = np.asarray(candidates, dtype=np.int64)
        scores = validate_scores(self.policy.eviction_scores(layer, ids, self), len(candidates), self.policy)
        if len(candidates) == 1:  # still asked: stateful policies may track evictions; the answer cannot change
            return candidates[0]
        # lowest score first, then least recently used, then lowest expert id (plain Python: lexsort costs more
        # than the whole decision for a handful of candidates)
        return min(zip(scores.tolist(), self._last_use[layer][ids].tolist(), candidates, strict=True))[2]

    def _victim_across(self, pool: _Pool, protected: dict[int, set[int]], allow_in_flight: bool) -> tuple[int, int]:
        """The lowest-scored candidate among every layer of a shared pool (the policy ranks across layers)."""
        num_experts = self.spec.num_experts
        for include_in_flight in (False, True) if allow_in_flight else (False,):
            by_layer: dict[int, list[int]] = {}
            for key in pool.key_in:
                layer, expert = divmod(key, num_experts)
                if expert in protected.get(layer, ()) or (not include_in_flight and expert in self._pending[layer]):
                    continue
                by_layer.setdefault(layer, []).append(expert)
            if by_layer:
                break
        else:
            return -1, -1
        best: tuple[float, int, int, int] | None = None
        for layer in sorted(by_layer):
            candidates = sorted(by_layer[layer])
            ids = np.asarray(candidates, dtype=np.int64)
            scores = validate_scores(self.policy.eviction_scores(layer, ids, self), len(candidates), self.policy)
            last = self._last_use[layer][ids].tolist()
            for score, used, expert in zip(scores.tolist(), last, candidates, strict=True):
                ranked = (score, used, layer, expert)
                if best is None or ranked < best:
                    best = ranked
        assert best is not None
        return best[2], best[3]

    def _install(self, layer: int, expert: int, slot: int, evicted: int, evicted_layer: int, prefetch: bool) -> Load:
        self._slot_of[layer][expert] = slot
        self._pool_of[layer].key_in[slot] = layer * self.spec.num_experts + expert
        self._loaded_at[layer][expert] = self._clock
        self.counters.bytes_moved += self.spec.expert_bytes
        return Load(layer, expert, slot, evicted, prefetch, evicted_layer)

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
        # a prefetch never evicts an expert requested in the same call (it would evict what it asked for), nor
        # (in a shared pool) one that the current layer has just acquired
        protected: dict[int, set[int]] = {event.layer: set(event.experts)}
        for target_layer, expert in pairs:
            protected.setdefault(target_layer, set()).add(expert)
        for target_layer, expert in pairs:
            if target_layer == event.layer:
                continue  # this layer is already served; nothing to gain
            if self._slot_of[target_layer][expert] >= 0:
                continue
            slot, evicted, evicted_layer = self._make_room(target_layer, protected, allow_in_flight=False)
            if slot < 0:
                continue  # every slot of that pool holds an in-flight prefetch
            plan.prefetches.append(self._install(target_layer, expert, slot, evicted, evicted_layer, prefetch=True))
            self._pending[target_layer].add(expert)
            self._prefetched_unused[target_layer].add(expert)
            self.counters.prefetch_issued += 1


def _overrides(policy: Policy, hook: str) -> bool:
    """Whether `policy` (or a part of a CombinedPolicy) replaces Policy's no-op `hook` (observe, prefetch)."""
    if isinstance(policy, CombinedPolicy):
        return _overrides(policy.evict, hook) or _overrides(policy.prefetcher, hook)
    return hook in vars(policy) or getattr(type(policy), hook) is not getattr(Policy, hook)


def chunk_experts(experts: list[int] | tuple[int, ...], capacity: int) -> list[tuple[int, ...]]:
    """Split a prefill layer's expert union (ascending) into groups that fit the pool, in order."""
    ordered = sorted(experts)
    return [tuple(ordered[i : i + capacity]) for i in range(0, len(ordered), capacity)]
