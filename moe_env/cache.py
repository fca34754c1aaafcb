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

These rules are implemented once, compiled, in moe_env.cache_kernel, over this class's state arrays.
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


_COUNTER_FIELDS = tuple(f for f in Counters.__dataclass_fields__)  # the kernel's counter deltas, in this order
# Policy.replay_kernel values ranked in the kernel
BUILTIN_RANKINGS = ("lru", "fifo", "lfu", "lfu-decay", "belady", "random", "lfuda")
BUILTIN_PREFETCHERS = ("lookahead", "oracle", "affinity")  # Policy.replay_prefetch values a replay takes from the trace


@dataclass
class EventArrays:
    """Events in the kernel's CSR form (moe_env.cache_kernel): ``ev`` [n, 3] (layer, step, flags), accesses
    ``experts[acc_off[i]:acc_off[i + 1]]``, prefetch requests ``req_key[req_off[i]:req_off[i + 1]]`` (keys layer
    * E + expert); the kernel writes ``acc_out`` [accesses, 3] and ``req_out`` [requests, 2]. ``following``: per
    access the index of the next access of the same key (belady ranked in the kernel), else None."""

    ev: np.ndarray
    acc_off: np.ndarray
    experts: np.ndarray
    req_off: np.ndarray
    req_key: np.ndarray
    acc_out: np.ndarray
    req_out: np.ndarray
    following: np.ndarray | None = None


class ExpertCacheState:
    """Slot pools and counters; implements moe_env.policy.CacheView.

    ``capacity``: an int (that many slots per layer, uniform) or an Allocation. ``prefill``: "chunked" (the
    prompt's experts go through the cache in pool-sized chunks) or "bypass".

    The state is arrays (slot, last use, use count, load clock per (layer, expert); in-flight and
    prefetched-unused flags; every pool's slots), shared with the compiled rules in moe_env.cache_kernel: ``route``
    hands them one event, ``route_events`` a sequence of events; Python is consulted only for a victim when the
    policy ranks in Python, and for the plug-in's own ``observe`` and ``prefetch``.
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
        from moe_env import cache_kernel  # numba: imported by the first cache, never by `import moe_env`

        self._kernel = cache_kernel.advance
        self.spec = spec
        self.allocation = allocation
        self.capacity = max(allocation.layer_slots(layer) for layer in range(spec.num_layers))
        self.prefill = prefill
        self.policy = policy
        self.oracle = oracle
        self._counters = Counters()
        self._layer_slots = [allocation.layer_slots(layer) for layer in range(spec.num_layers)]
        self._bypass_above = [allocation.share(layer) for layer in range(spec.num_layers)]
        layers, experts = spec.num_layers, spec.num_experts
        sizes = np.asarray(allocation.pool_slots, dtype=np.int64)
        self._pools = np.zeros((len(sizes), 3), dtype=np.int64)  # first slot, size, filled
        self._pools[:, 0] = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._pools[:, 1] = sizes
        self._pool_shared = [allocation.layer_pool.count(p) > 1 for p in range(len(sizes))]
        self._layer_pool = np.asarray(allocation.layer_pool, dtype=np.int64)
        self._key_in = np.full(int(sizes.sum()), -1, dtype=np.int64)
        self._ints = np.zeros((4, layers, experts), dtype=np.int64)  # slot, last use, use count, load clock
        self._slot_of, self._last_use, self._use_count, self._loaded_at = self._ints
        self._flags = np.zeros((2, layers, experts), dtype=np.bool_)  # in flight, prefetched and not yet used
        self._pending, self._prefetched_unused = self._flags
        self._scalars = np.zeros(cache_kernel.NUM_SCALARS, dtype=np.int64)
        self._deltas = self._scalars[1 : 1 + len(_COUNTER_FIELDS)]
        self._stamp = np.zeros(layers * experts, dtype=np.int64)
        self._read_only_views = tuple(_read_only(a) for a in (self._last_use, self._use_count, self._loaded_at))
        # one event's buffers for route(), reused
        self._ev1 = np.zeros((1, 3), dtype=np.int64)
        self._acc_off1 = np.zeros(2, dtype=np.int64)
        self._experts1 = np.zeros(experts, dtype=np.int64)
        self._acc_out1 = np.zeros((experts, 3), dtype=np.int64)
        self._no_requests = (np.zeros(2, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, 2), np.int64))
        self._cursor = np.zeros(6, dtype=np.int64)
        self._cand = np.zeros(max(1, int(sizes.max())), dtype=np.int64)
        self._no_table, self._no_index = np.zeros((1, 1)), np.zeros(1, dtype=np.int64)
        self._no_aging = (np.zeros((1, 1)), np.zeros(1), np.zeros((1, 1), dtype=np.int64), np.zeros((1, 2), np.int64))
        self._no_counts, self._scratch = np.zeros((1, 1, 1)), np.zeros((2, experts))
        self._no_rng = np.zeros(0)  # the kernel's generator argument when the ranking draws nothing
        self._started = False
        self.begin_sequence()

    # -- CacheView -------------------------------------------------------------------------------------------
    @property
    def clock(self) -> int:
        return int(self._scalars[0])

    @property
    def counters(self) -> Counters:
        return self._counters

    @counters.setter
    def counters(self, value: Counters) -> None:
        self._counters = value

    def kernel_arrays(self) -> tuple[np.ndarray, ...]:
        """(ints, flags, key_in, pools, layer_pool, scalars, stamp, cursor, cand, scratch): the state that
        cache_kernel.advance routes over, for a compiled driver that ranks victims itself (agents/scored_replay.py,
        a learned plug-in's replay); it calls ``fold_counters`` when done."""
        return (self._ints, self._flags, self._key_in, self._pools, self._layer_pool, self._scalars, self._stamp,
                self._cursor, self._cand, self._scratch)  # fmt: skip

    def fold_counters(self) -> None:
        """Add the kernel's counter deltas to the Counters (after a compiled driver routed through the kernel)."""
        self._fold_counters()

    def _fold_counters(self) -> None:
        """Add the kernel's counter deltas to the Counters (after every call that routes)."""
        deltas = self._deltas
        values = deltas.tolist()
        counters = self._counters.__dict__  # a plain dataclass: its fields are its __dict__
        for name, delta in zip(_COUNTER_FIELDS, values, strict=True):
            if delta:
                counters[name] += delta
        deltas[:] = 0

    def layer_capacity(self, layer: int) -> int:
        """The most experts of `layer` that can be resident at once (its pool's slots, at most all experts)."""
        return self._layer_slots[layer]

    def resident(self, layer: int) -> list[int]:
        first, _, filled = self._pools[self._layer_pool[layer]].tolist()
        keys = self._key_in[first : first + filled]
        base = layer * self.spec.num_experts
        return (keys[(keys >= base) & (keys < base + self.spec.num_experts)] - base).tolist()

    def is_resident(self, layer: int, expert: int) -> bool:
        return bool(self._slot_of[layer, expert] >= 0)

    def slot_of(self, layer: int, expert: int) -> int:
        return int(self._slot_of[layer, expert])

    def pool_index(self, layer: int) -> int:
        """The pool whose slots `layer` uses (drivers index their slot tensors by it)."""
        return self.allocation.layer_pool[layer]

    def in_flight(self, layer: int) -> list[int]:
        return np.flatnonzero(self._pending[layer]).tolist()

    # rows of read-only views made once: a plug-in that writes into them gets a ValueError instead of corrupting
    # the cache (setting the flag per call costs ~2.5 us)
    def last_use(self, layer: int) -> np.ndarray:
        return self._read_only_views[0][layer]

    def use_count(self, layer: int) -> np.ndarray:
        return self._read_only_views[1][layer]

    def loaded_at(self, layer: int) -> np.ndarray:
        return self._read_only_views[2][layer]

    def next_use(self, layer: int, expert: int) -> float:
        if self.oracle is None:
            raise OracleUnavailable("next_use needs the future: only trace replay (sim, env) provides it")
        return self.oracle.next_use(layer, expert, self.clock)

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
        self._bind_hooks()
        self.policy.begin_sequence(self)

    def _bind_hooks(self) -> None:
        """Which of the plug-in's hooks run in Python, and the ranking the kernel applies itself (if any)."""
        policy = self.policy
        combined = isinstance(policy, CombinedPolicy) and type(policy).observe is CombinedPolicy.observe
        evict = policy.evict if combined else policy
        self.ranking = builtin_ranking(evict)
        self._rank, self._decay, self._table, self._aging = self._kernel_rank(self.ranking, evict)
        parts = (policy.evict, policy.prefetcher) if combined else (policy,)
        # lfu-decay's and lfuda's observe are the kernel's (on the policy's own arrays); others are the plug-in's
        in_kernel = evict if self._table is not self._no_table else None
        self._observers = [part for part in parts if _overrides(part, "observe") and part is not in_kernel]
        self._prefetches = _overrides(policy, "prefetch")

    def _kernel_rank(self, ranking: str | None, evict: Policy) -> tuple[int, float, np.ndarray, tuple]:
        """(rank, decay, score table, lfuda's other arrays): placeholders where the ranking keeps no state."""
        from moe_env import cache_kernel as k

        self._rng = evict.generator if ranking == "random" else self._no_rng
        if ranking == "lfu-decay":
            return k.RANK_DECAY, float(evict.decay), evict.score_table, self._no_aging
        if ranking == "lfuda":
            key, *aging = evict.aging_state
            return k.RANK_LFUDA, 1.0, key, tuple(aging)
        ranks = {"lru": k.RANK_LRU, "fifo": k.RANK_FIFO, "lfu": k.RANK_LFU, "random": k.RANK_RANDOM}
        # belady: ranked in the kernel in replay only
        return ranks.get(ranking or "", k.RANK_PYTHON), 1.0, self._no_table, self._no_aging

    def _empty(self) -> None:
        self._ints[0] = -1
        self._ints[1] = -1
        self._ints[2] = 0
        self._ints[3] = -1
        self._flags[:] = False
        self._key_in[:] = -1
        self._pools[:, 2] = 0
        self._stamp[:] = 0
        self._scalars[0] = 0  # the clock; the counter deltas are the counters' own
        self._scalars[1 + len(_COUNTER_FIELDS) :] = 0  # the event serial, the in-flight count, affinity's last event

    def finish(self) -> None:
        """Close the sequence's accounting: prefetched experts not used so far are wasted (warm: a later hit on
        one of them is a plain hit)."""
        unused = self._prefetched_unused
        count = int(np.count_nonzero(unused))
        if count:
            self._counters.prefetch_wasted += count
            unused[:] = False

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
        for observer in self._observers:
            observer.observe(event, self)
        count = len(experts)
        ev = self._ev1
        ev[0, 0] = layer
        ev[0, 1] = event.step
        ev[0, 2] = event_flags(event.prefill, event.bypass, event.step)
        self._acc_off1[1] = count
        self._experts1[:count] = experts
        req_off, req_key, req_out = self._no_requests
        cursor = self._cursor
        cursor[:] = 0
        victim = -1
        while True:
            status = self._advance(ev, self._acc_off1, self._experts1, req_off, req_key, self._acc_out1, req_out,
                                   victim, 1, self._rank, self._no_index, self._no_index, self._prefetches,
                                   self._no_counts, 0)  # fmt: skip
            if status == 0:
                break
            if status == 1:
                victim = self._python_victim(int(cursor[4]))
            else:
                victim = -1
                req_key = np.asarray(self._prefetch_requests(event), dtype=np.int64)
                req_off = np.asarray([0, len(req_key)], dtype=np.int64)
                req_out = np.zeros((len(req_key), 2), dtype=np.int64)
        self._fold_counters()  # a caller may hold the Counters object and read it between events
        return self._plan(event, self._acc_out1[:count].tolist(), req_key.tolist(), req_out.tolist())

    def route_events(self, events: EventArrays, first: int, end: int) -> None:
        """Route events first..end-1 of `events` (their prefetch requests included) through the kernel: the
        replay's form of ``route``, for a plug-in without Python ``observe`` or ``prefetch`` hooks (the caller
        checks ``python_hooks``). Belady ranks in the kernel when ``events.following`` is given (``begin_future``
        first)."""
        if not self.routes_in_kernel:
            raise ValueError("route_events cannot call a plug-in's observe or prefetch: route each event instead")
        rank, following, nxt = self._rank, self._no_index, self._no_index
        if self.ranking == "belady" and events.following is not None:
            from moe_env.cache_kernel import RANK_BELADY

            rank, following, nxt = RANK_BELADY, events.following, self._next_access
        counts, affinity_k = self._no_counts, 0
        prefetcher = builtin_prefetcher(self.policy)
        if prefetcher is not None and _kind(prefetcher) == "affinity":
            counts, affinity_k = prefetcher.count_table, min(prefetcher.k or self.spec.top_k, self.capacity)
        from moe_env.cache_kernel import AFFINITY_PREVIOUS

        self._scalars[AFFINITY_PREVIOUS] = -1  # no decode event of this call before the first
        cursor = self._cursor
        cursor[:] = 0
        cursor[0] = first
        victim = -1
        while self._advance(events.ev, events.acc_off, events.experts, events.req_off, events.req_key, events.acc_out,
                            events.req_out, victim, end, rank, following, nxt, False, counts, affinity_k):  # fmt: skip
            victim = self._python_victim(int(cursor[4]))
        self._fold_counters()

    def begin_future(self, events: EventArrays, first: int, end: int) -> None:
        """Belady in the kernel: each key's next access is its first among events first..end-1 (the future of
        the stream starting here; moe_env.sim calls this when the cache starts empty or a warm stream begins)."""
        from moe_env.cache_kernel import first_accesses

        self._next_access = np.empty(self.spec.num_layers * self.spec.num_experts, dtype=np.int64)
        first_accesses(events.ev, events.acc_off, events.experts, first, end, self.spec.num_experts, self._next_access)

    @property
    def routes_in_kernel(self) -> bool:
        """Whether ``route_events`` can route for this plug-in: no Python observe and no prefetch other than a
        built-in prefetcher's (``builtin_prefetcher``: the caller puts its requests in the events, or, affinity,
        the kernel keeps its table)."""
        prefetcher = builtin_prefetcher(self.policy)
        if self._prefetches and prefetcher is None:
            return False
        return all(part is prefetcher and _kind(part) == "affinity" for part in self._observers)

    def _advance(self, ev, acc_off, experts, req_off, req_key, acc_out, req_out, victim, end, rank, following, nxt,
                 python_prefetch, counts, affinity_k) -> int:  # fmt: skip
        return self._kernel(self._ints, self._flags, self._key_in, self._pools, self._layer_pool, self._scalars,
                            self._stamp, ev, acc_off, experts, req_off, req_key, acc_out, req_out, self._cursor,
                            self._cand, victim, end, rank, self._decay, self._table, self._aging, following, nxt,
                            self.spec.num_experts, self.spec.expert_bytes, python_prefetch, counts, affinity_k,
                            self._scratch, self._rng)  # fmt: skip

    def _plan(self, event: RouteEvent, accesses: list, requests: list, placed: list) -> Plan:
        num_experts = self.spec.num_experts
        plan = Plan(event=event)
        plan.slots = [out[1] for out in accesses]
        plan.hit = [bool(out[0] & 1) for out in accesses]
        plan.was_in_flight = [bool(out[0] & 2) for out in accesses]
        layer = event.layer
        for expert, (flag, slot, evicted) in zip(event.experts, accesses, strict=True):
            if flag & 1:
                continue
            if event.bypass:
                plan.bypass.append(expert)
            else:
                gone_layer, gone = divmod(evicted, num_experts) if evicted >= 0 else (-1, -1)
                plan.loads.append(Load(layer, expert, slot, gone, False, gone_layer))
        for key, (slot, evicted) in zip(requests, placed, strict=True):
            if slot >= 0:
                gone_layer, gone = divmod(evicted, num_experts) if evicted >= 0 else (-1, -1)
                plan.prefetches.append(Load(*divmod(key, num_experts), slot, gone, True, gone_layer))
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

    def _python_victim(self, count: int) -> int:
        """The plug-in's victim among the kernel's candidates (keys, ascending): one eviction_scores call per layer
        of them, validated in O(candidates); ties to the least recently used, then the lowest (layer, expert)."""
        num_experts = self.spec.num_experts
        keys = self._cand[:count]
        layers = keys // num_experts
        if not self._pool_shared[self._layer_pool[layers[0]]]:
            layer = int(layers[0])
            ids = keys - layer * num_experts
            candidates = ids.tolist()
            scores = validate_scores(self.policy.eviction_scores(layer, ids, self), count, self.policy)
            if count == 1:  # still asked: stateful policies may track evictions; the answer cannot change
                return layer * num_experts + candidates[0]
            used = self._last_use[layer][candidates].tolist()
            return layer * num_experts + min(zip(scores.tolist(), used, candidates, strict=True))[2]
        best: tuple[float, int, int] | None = None
        bounds = np.flatnonzero(np.diff(layers)) + 1
        for group in np.split(keys, bounds):
            layer = int(group[0]) // num_experts
            ids = group - layer * num_experts
            candidates = ids.tolist()
            scores = validate_scores(self.policy.eviction_scores(layer, ids, self), len(candidates), self.policy)
            used = self._last_use[layer][candidates].tolist()
            for score, last, expert in zip(scores.tolist(), used, candidates, strict=True):
                ranked = (score, last, layer * num_experts + expert)
                if best is None or ranked < best:
                    best = ranked
        assert best is not None
        return best[2]

    def _prefetch_requests(self, event: RouteEvent) -> list[int]:
        """The plug-in's prefetch requests as keys, each checked (O(requests)); the kernel installs them."""
        requests = self.policy.prefetch(event, self)
        if not requests:
            return []
        num_layers, num_experts = self.spec.num_layers, self.spec.num_experts
        keys: list[int] = []
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
            keys.append(target_layer * num_experts + expert)
        return keys


def event_flags(prefill: bool, bypass: bool, step: int) -> int:
    """An event's flags in the kernel's encoding (moe_env.cache_kernel: PREFILL 1, BYPASS 2, FIRST 4)."""
    return (1 if prefill else 0) | (2 if bypass else 0) | (4 if not prefill and step < FIRST_TOKENS else 0)


def builtin_prefetcher(policy: Policy) -> Policy | None:
    """The part of `policy` whose prefetch a kernel replay does itself (its class's own ``replay_prefetch``:
    lookahead and oracle, requests built by moe_env.sim_kernels; affinity, run in the kernel), else None."""
    part = policy
    if isinstance(policy, CombinedPolicy) and type(policy).prefetch is CombinedPolicy.prefetch:
        if _overrides(policy.evict, "prefetch"):
            return None
        part = policy.prefetcher
    return part if _kind(part) in BUILTIN_PREFETCHERS else None


def _kind(policy: Policy) -> str | None:
    return type(policy).__dict__.get("replay_prefetch")


def builtin_ranking(policy: Policy) -> str | None:
    """The ranking the kernel applies for `policy` (its class's own ``replay_kernel``, never inherited), else None."""
    kernel = type(policy).__dict__.get("replay_kernel")
    return kernel if kernel in BUILTIN_RANKINGS else None


def _overrides(policy: Policy, hook: str) -> bool:
    """Whether `policy` (or a part of a CombinedPolicy) replaces Policy's no-op `hook` (observe, prefetch)."""
    if isinstance(policy, CombinedPolicy):
        return _overrides(policy.evict, hook) or _overrides(policy.prefetcher, hook)
    return hook in vars(policy) or getattr(type(policy), hook) is not getattr(Policy, hook)


def chunk_experts(experts: list[int] | tuple[int, ...], capacity: int) -> list[tuple[int, ...]]:
    """Split a prefill layer's expert union (ascending) into groups that fit the pool, in order."""
    ordered = sorted(experts)
    return [tuple(ordered[i : i + capacity]) for i in range(0, len(ordered), capacity)]
