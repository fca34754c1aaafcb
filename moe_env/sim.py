"""Trace replay through any Policy with the cost model: the offline twin of the engine.

The cache decisions are ExpertCacheState.route's (the one decision point, shared with the engine and the env);
this module adds the future (``TraceOracle``, for Belady and the oracle prefetcher) and time:

per layer and token, the layer's non-expert compute runs first (the router needs it); then its demand loads
are queued on ONE FIFO copy link, behind whatever earlier prefetches are still copying (so a wrong prefetch
delays demand loads), and this layer's prefetches are queued behind them; each expert is computed in router
order once its copy has landed. ``stall`` is the time compute waits on copies. Copies overlap compute.

Prefill is timed as one token per layer (a lower bound on its compute) and reported apart (``prefill_stall_s``);
the headline metrics are decode's.

``Replayer`` is the stepwise form (begin_sequence / process one LayerRouting / finish) that the Gymnasium env
drives one layer at a time; ``simulate`` replays a whole trace.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from moe_env import sim_kernels
from moe_env.allocation import Allocation
from moe_env.cache import Counters, EventArrays, ExpertCacheState, Plan, builtin_prefetcher
from moe_env.costmodel import (
    AS_RECORDED,
    DEFAULT_PROFILE,
    EXPERT_PROFILES,
    CostModel,
    recorded_experts,
    resolve_profile,
)
from moe_env.errors import UsageError
from moe_env.policy import CombinedPolicy, ModelSpec, Policy, build_policy
from moe_env.routing import LayerRouting, PrefillLayout, route_events
from moe_env.trace import SequenceTrace, Trace, TraceMeta

# (policy, cache, events, first, end, sequence, vocab): routes events first..end-1 of one sequence
CompiledRouter = Callable[[Policy, ExpertCacheState, EventArrays, int, int, SequenceTrace, "list | None"], None]


class TraceOracle:
    """The future of one request stream (one sequence when cold, all of them when warm), in the clock numbering
    of ExpertCacheState (one tick per access, route order, not restarted between requests of a warm stream).

    Built by walking the exact RouteEvents the replay will route (prefill grouping depends on the cache's
    layout: `capacity` is a chunk size or the cache itself). ``future_experts`` reads the current sequence
    (``set_sequence``).
    """

    def __init__(
        self,
        sequence: SequenceTrace | Sequence[SequenceTrace],
        num_layers: int,
        num_experts: int,
        capacity: int | PrefillLayout,
    ):
        sequences = [sequence] if isinstance(sequence, SequenceTrace) else list(sequence)
        layers: list[np.ndarray] = []
        experts: list[np.ndarray] = []
        for seq in sequences:
            if seq.prefill_experts is not None and len(seq.prefill_experts):
                for routing in seq.routings():
                    if not routing.prefill:
                        break
                    for event in route_events(routing, capacity):
                        layers.append(np.full(len(event.experts), event.layer))
                        experts.append(np.asarray(event.experts))
            # decode: one event per present cell, step-major then layer, k accesses each (SequenceTrace.routings)
            cells = seq.experts
            present = cells[:, :, 0] >= 0
            layers.append(np.repeat(np.nonzero(present)[1], cells.shape[2]))
            experts.append(cells[present].reshape(-1))
        all_layers = np.concatenate(layers).astype(np.int64)
        all_experts = np.concatenate(experts).astype(np.int64)
        clocks = np.arange(1, len(all_layers) + 1)  # the cache ticks once per access, first access = 1
        order = np.argsort(all_layers * num_experts + all_experts, kind="stable")
        keys = (all_layers * num_experts + all_experts)[order]
        bounds = np.searchsorted(keys, np.arange(num_layers * num_experts + 1))
        ordered = clocks[order].tolist()
        self._uses = [
            [ordered[bounds[key] : bounds[key + 1]] for key in range(layer * num_experts, (layer + 1) * num_experts)]
            for layer in range(num_layers)
        ]
        self._sequences = sequences
        self.set_sequence(0)

    def set_sequence(self, index: int) -> None:
        """The request whose decode steps ``future_experts`` reads."""
        self._experts = self._sequences[index].experts
        self._num_steps, self._num_layers = self._experts.shape[0], self._experts.shape[1]

    def next_use(self, layer: int, expert: int, clock: int) -> float:
        """Accesses from `clock` until the next access of (layer, expert); inf if it is never used again."""
        uses = self._uses[layer][expert]
        i = bisect_right(uses, clock)
        return math.inf if i == len(uses) else float(uses[i] - clock)

    def future_experts(self, step: int, layer: int) -> tuple[int, ...] | None:
        """The experts decode step `step` routes to at `layer`; None past the end, for prefill or an absent cell."""
        if not (0 <= step < self._num_steps and 0 <= layer < self._num_layers):
            return None
        row = self._experts[step, layer].tolist()
        return None if row[0] < 0 else tuple(row)


@dataclass
class LayerOutcome:
    """What one routed layer (one LayerRouting) cost: the env's reward is built from this."""

    layer: int
    step: int
    hits: int
    misses: int
    prefetch_issued: int
    stall_s: float  # compute waiting on copies in this layer
    time_s: float  # wall time of this layer on the compute timeline (stall included)
    link_backlog_s: float  # copy work queued on the link when the layer finished
    plans: list[Plan] = field(default_factory=list)


@dataclass
class SimResult:
    """Metrics of one replay; names match the engine's. Headline counters are decode-only (prefill kept apart).

    prefetch_precision = prefetch_used / prefetch_issued.
    prefetch_recall = prefetch_used / (prefetch_used + misses): of the decode accesses that were not already
    resident before their layer was routed (served by a prefetch, or a demand miss), the share a prefetch served.
    """

    policy: str
    capacity: int  # the most slots one layer can hold
    profile: str
    hits: int
    misses: int
    hit_rate: float
    prefill_hits: int
    prefill_misses: int
    prefetch_issued: int
    prefetch_used: int
    prefetch_wasted: int
    prefetch_precision: float
    prefetch_recall: float
    evictions: int
    bytes_moved: int
    decode_tokens: int
    stall_s: float
    prefill_stall_s: float
    decode_time_s: float
    stall_s_per_token: float
    tokens_per_s: float
    allocation: str = "uniform"
    total_slots: int = 0  # slots in all layers together (the budget)
    warm: bool = False
    prefill: str = "chunked"
    first_hit_rate: float = 0.0  # decode hit rate of the first FIRST_TOKENS steps of each sequence
    bypass_loads: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SimTally:
    """The additive form of a replay over some sequences: integer counters and one float per sequence.

    Cold sequences replay independently (the cache starts empty), so replays of disjoint shards of a trace merge
    into exactly the replay of the whole: counters add, and each time total is ``math.fsum`` of its per-sequence
    values (correctly rounded: neither shard boundaries nor merge order change a bit). Ratios (hit rate,
    precision, stall per token) are derived from the sums, in ``result`` only.
    """

    counters: Counters = field(default_factory=Counters)
    decode_tokens: int = 0
    stall_s: list[float] = field(default_factory=list)  # per sequence (per stream when warm)
    prefill_stall_s: list[float] = field(default_factory=list)
    decode_time_s: list[float] = field(default_factory=list)

    def add_sequence(self, stall_s: float, prefill_stall_s: float, decode_time_s: float) -> None:
        self.stall_s.append(stall_s)
        self.prefill_stall_s.append(prefill_stall_s)
        self.decode_time_s.append(decode_time_s)

    @classmethod
    def merge(cls, tallies: Sequence[SimTally]) -> SimTally:
        total = cls()
        for tally in tallies:
            for f in fields(Counters):
                setattr(total.counters, f.name, getattr(total.counters, f.name) + getattr(tally.counters, f.name))
            total.decode_tokens += tally.decode_tokens
            total.stall_s += tally.stall_s
            total.prefill_stall_s += tally.prefill_stall_s
            total.decode_time_s += tally.decode_time_s
        return total

    def result(self, policy: str, allocation: Allocation, profile: str, warm: bool, prefill: str) -> SimResult:
        return _result(policy, allocation, profile, self.counters, self.decode_tokens, math.fsum(self.stall_s),
                       math.fsum(self.prefill_stall_s), math.fsum(self.decode_time_s), warm, prefill)  # fmt: skip


def model_spec(meta: TraceMeta, expert_bytes: int | None = None) -> ModelSpec:
    return ModelSpec(
        num_layers=meta.num_layers,
        num_experts=meta.num_experts,
        top_k=meta.top_k,
        expert_bytes=meta.expert_bytes if expert_bytes is None else expert_bytes,
        name=meta.model,
    )


def cost_model_for(meta: TraceMeta, profile: str | CostModel | None) -> CostModel:
    """A CostModel from a spec (``HARDWARE[:EXPERTS]``). Without EXPERTS: the trace's recorded expert size, else
    the one full-precision real model of the trace's shape (e.g. a converted Mixtral-8x7B log), else an error."""
    if isinstance(profile, CostModel):
        return profile
    spec = profile or DEFAULT_PROFILE
    hardware, _, experts = spec.partition(":")
    if not experts and meta.expert_bytes <= 0:
        shape = (meta.num_layers, meta.num_experts, meta.top_k)
        same = [p for p in EXPERT_PROFILES.values() if (p.num_layers, p.num_experts, p.top_k) == shape]
        native = [p for p in same if not p.name.endswith("bit")]
        if len(native) == 1:
            return resolve_profile(f"{hardware}:{native[0].name}")
    recorded = None
    if not experts or experts == AS_RECORDED:
        recorded = recorded_experts(meta.expert_bytes, meta.num_layers, meta.num_experts, meta.top_k, meta.model)
    return resolve_profile(spec, recorded)


def check_capacity(meta: TraceMeta, capacity: int | Allocation) -> None:
    if isinstance(capacity, Allocation):
        if (capacity.num_layers, capacity.num_experts) != (meta.num_layers, meta.num_experts):
            raise UsageError(
                f"cache allocation for {capacity.num_layers} layers x {capacity.num_experts} experts, trace has "
                f"{meta.num_layers} x {meta.num_experts}"
            )
        capacity.check(meta.top_k)
        return
    if not meta.top_k <= capacity <= meta.num_experts:
        raise UsageError(
            f"cache slots {capacity} outside {meta.top_k}..{meta.num_experts} "
            f"(a layer must hold its top-{meta.top_k} experts at once)"
        )


class Replayer:
    """Stepwise replay: ``begin_sequence(seq)``, ``process(routing)`` per LayerRouting, ``finish() -> SimResult``.

    ``cache`` (ExpertCacheState) is public and read-only for callers: it is the CacheView policies see. The
    oracle is built per sequence when the policy needs the future or ``with_oracle`` is set; with ``warm`` the
    cache is kept between sequences (one request stream) and the oracle spans the stream given to
    ``begin_stream``. ``capacity``: slots per layer or an Allocation; ``prefill``: "chunked" or "bypass".
    """

    def __init__(
        self,
        meta: TraceMeta,
        policy: Policy,
        capacity: int | Allocation,
        cost: CostModel,
        with_oracle: bool = False,
        prefill: str = "chunked",
        warm: bool = False,
    ) -> None:
        check_capacity(meta, capacity)
        self.meta = meta
        self.spec = model_spec(meta, cost.expert_bytes)
        self.cost = cost
        self.policy = policy
        self.with_oracle = with_oracle or policy.needs_future
        self.warm = warm
        vocab = meta.extra.get("vocab") if isinstance(meta.extra, dict) else None
        self._vocab: list | None = vocab if isinstance(vocab, list) else None  # import-local ids -> token text
        policy.bind_cost_model(cost)
        self.cache = ExpertCacheState(self.spec, capacity, policy, prefill=prefill)
        self.capacity = self.cache.capacity
        self._stream: list[SequenceTrace] | None = None
        self._stream_oracle: TraceOracle | None = None
        self._copy_s = cost.copy_s
        self._expert_s = cost.expert_compute_s
        self._layer_s = cost.layer_compute_s
        self._decode_tokens = 0
        self._sequence_times: list[tuple[float, float, float]] = []  # (stall, prefill stall, decode time) each
        self._stall_s = self._prefill_stall_s = self._decode_time_s = 0.0  # of the sequence being replayed
        self._replaying = False
        self._begin_timeline()

    def _begin_timeline(self) -> None:
        self._now = 0.0  # compute timeline of the current sequence
        self._link_free = 0.0  # when the FIFO link finishes its queued copies
        self._ready = [[0.0] * self.meta.num_experts for _ in range(self.meta.num_layers)]  # copy landed at
        self._last_step = -2

    def begin_stream(self, sequences: Sequence[SequenceTrace]) -> None:
        """Warm replay: the sequences that will follow, in order (the oracle's future spans all of them)."""
        self._stream = list(sequences)
        self._stream_oracle = None

    def begin_sequence(self, sequence: SequenceTrace | None = None) -> None:
        """Start a request: cold, empty the cache and reset the policy; warm, keep both. The oracle (when needed)
        is built from `sequence` (cold) or from the stream given to begin_stream (warm)."""
        oracle = None
        if self.with_oracle:
            if sequence is None:
                raise UsageError(f"policy {self.policy.name!r} reads the future: pass the sequence to replay")
            if self.warm:
                oracle = self._warm_oracle(sequence)
            else:
                oracle = TraceOracle(sequence, self.meta.num_layers, self.meta.num_experts, self.cache)
        self._close_sequence()
        self.cache.oracle = oracle  # before begin_sequence: a policy may read the future as the sequence starts
        self.cache.begin_sequence(warm=self.warm)
        self._begin_timeline()

    def _close_sequence(self) -> None:
        if self._replaying:
            self._sequence_times.append((self._stall_s, self._prefill_stall_s, self._decode_time_s))
            self._stall_s = self._prefill_stall_s = self._decode_time_s = 0.0
            self._replaying = False

    def _warm_oracle(self, sequence: SequenceTrace) -> TraceOracle:
        stream = self._stream
        if stream is None or not any(seq is sequence for seq in stream):
            raise UsageError("a warm replay that reads the future needs begin_stream(sequences) first")
        if self._stream_oracle is None:
            self._stream_oracle = TraceOracle(stream, self.meta.num_layers, self.meta.num_experts, self.cache)
        self._stream_oracle.set_sequence(next(i for i, seq in enumerate(stream) if seq is sequence))
        return self._stream_oracle

    @property
    def link_backlog_s(self) -> float:
        return max(0.0, self._link_free - self._now)

    def process(self, routing: LayerRouting) -> LayerOutcome:
        """Route one layer's forward pass through the cache and advance the timeline."""
        self._replaying = True
        vocab = self._vocab
        if vocab is not None and isinstance(routing.token, int) and 0 <= routing.token < len(vocab):
            routing = replace(routing, token=vocab[routing.token])  # ids of an import mean nothing elsewhere
        if routing.step != self._last_step:
            self._last_step = routing.step
            if routing.step >= 0:
                self._decode_tokens += 1
        start = self._now
        t = start + self._layer_s
        stall = 0.0
        hits = misses = issued = 0
        plans = []
        ready = self._ready
        copy_s, expert_s = self._copy_s, self._expert_s
        for event in route_events(routing, self.cache):
            plan = self.cache.route(event)
            plans.append(plan)
            link = self._link_free
            for load in plan.loads:  # demand loads first, then this layer's prefetches, all FIFO
                link = max(link, t) + copy_s
                ready[load.layer][load.expert] = link
            for load in plan.prefetches:
                link = max(link, t) + copy_s
                ready[load.layer][load.expert] = link
            self._link_free = link
            for expert in plan.bypass:  # streamed for this layer only, not installed: ready when copied
                link = max(link, t) + copy_s
                ready[event.layer][expert] = link
            self._link_free = link
            issued += len(plan.prefetches)
            layer_ready = ready[event.layer]
            for expert, hit in zip(event.experts, plan.hit, strict=True):
                if hit:
                    hits += 1
                else:
                    misses += 1
                landed = layer_ready[expert]
                if landed > t:
                    stall += landed - t
                    t = landed
                t += expert_s
        self._now = t
        if routing.step >= 0:
            self._stall_s += stall
            self._decode_time_s += t - start
        else:
            self._prefill_stall_s += stall
        return LayerOutcome(
            layer=routing.layer,
            step=routing.step,
            hits=hits,
            misses=misses,
            prefetch_issued=issued,
            stall_s=stall,
            time_s=t - start,
            link_backlog_s=self.link_backlog_s,
            plans=plans,
        )

    def record_sequence(self, stall_s: float, prefill_stall_s: float, decode_time_s: float, steps: int) -> None:
        """The times of a sequence replayed outside ``process`` (moe_env.sim's kernel replay), since begin_sequence."""
        self._replaying = True
        self._stall_s, self._prefill_stall_s, self._decode_time_s = stall_s, prefill_stall_s, decode_time_s
        self._decode_tokens += steps

    def tally(self) -> SimTally:
        """Close the accounting (unused prefetches become wasted) and return the additive metrics so far."""
        self._close_sequence()
        self.cache.finish()
        tally = SimTally(replace(self.cache.counters), self._decode_tokens)
        for times in self._sequence_times:
            tally.add_sequence(*times)
        return tally

    def finish(self) -> SimResult:
        """Close the accounting (unused prefetches become wasted) and return the metrics so far."""
        return self.tally().result(self.policy.name, self.cache.allocation, self.cost.name, self.warm,
                                   self.cache.prefill)  # fmt: skip


def _result(
    policy: str,
    cache: ExpertCacheState | Allocation,
    profile: str,
    c: Counters,
    tokens: int,
    stall_s: float,
    prefill_stall_s: float,
    decode_time_s: float,
    warm: bool,
    prefill: str = "chunked",
) -> SimResult:
    if isinstance(cache, ExpertCacheState):
        allocation, prefill = cache.allocation, cache.prefill
    else:
        allocation = cache
    return SimResult(
        policy=policy,
        capacity=max(allocation.layer_slots(layer) for layer in range(allocation.num_layers)),
        profile=profile,
        hits=c.hits,
        misses=c.misses,
        hit_rate=c.hit_rate,
        prefill_hits=c.prefill_hits,
        prefill_misses=c.prefill_misses,
        prefetch_issued=c.prefetch_issued,
        prefetch_used=c.prefetch_used,
        prefetch_wasted=c.prefetch_wasted,
        prefetch_precision=c.prefetch_used / c.prefetch_issued if c.prefetch_issued else 0.0,
        prefetch_recall=c.prefetch_used / (c.prefetch_used + c.misses) if c.prefetch_used + c.misses else 0.0,
        evictions=c.evictions,
        bytes_moved=c.bytes_moved,
        decode_tokens=tokens,
        stall_s=stall_s,
        prefill_stall_s=prefill_stall_s,
        decode_time_s=decode_time_s,
        stall_s_per_token=stall_s / tokens if tokens else 0.0,
        tokens_per_s=tokens / decode_time_s if decode_time_s > 0 else 0.0,
        allocation=allocation.describe(),
        total_slots=allocation.total_slots,
        warm=warm,
        prefill=prefill,
        first_hit_rate=c.first_hit_rate,
        bypass_loads=c.bypass_loads,
    )


def simulate(
    trace: Trace,
    policy: str | Policy,
    capacity: int | Allocation,
    profile: str | CostModel | None = None,
    prefetch: str | Policy | None = None,
    fast: bool = True,
    prefill: str = "chunked",
    warm: bool = False,
) -> SimResult:
    """Replay `trace` through `policy` (+ `prefetch`) with `capacity` slots per layer (or an Allocation); cold:
    every sequence starts empty; warm: the sequences are one request stream through one cache.

    ``fast``: replay in the cache kernel where the plug-in allows it (see ``replay``); False: one
    ExpertCacheState.route call per event.
    """
    cost = cost_model_for(trace.meta, profile)
    built = build_policy(policy, prefetch)
    tally = replay(trace, built, capacity, cost, fast=fast, prefill=prefill, warm=warm)
    return tally.result(built.name, as_allocation(trace.meta, capacity), cost.name, warm, prefill)


def as_allocation(meta: TraceMeta, capacity: int | Allocation) -> Allocation:
    if isinstance(capacity, Allocation):
        return capacity
    return Allocation.uniform(meta.num_layers, meta.num_experts, capacity)


def replay(
    trace: Trace,
    policy: Policy,
    capacity: int | Allocation,
    cost: CostModel,
    sequences: Sequence[int] | None = None,
    fast: bool = True,
    prefill: str = "chunked",
    warm: bool = False,
) -> SimTally:
    """The additive tally of replaying `sequences` (indices into trace.sequences; all by default) through a built
    policy: ``simulate`` is one call over everything; moe_env.sweep merges cold shards of it.

    A plug-in without Python observe or prefetch hooks (built-in prefetchers aside) is replayed a sequence at a
    time through the cache kernel (``ExpertCacheState.route_events``), and the time model as an array pass; so is
    one with a ``compiled_router`` (the set-scorer eviction plug-ins: agents/scored_replay.py feeds their features
    and ranks their victims in compiled code around the same kernel); otherwise, or with ``fast=False``, one
    ``route`` call per event (Replayer.process). Same decisions either way.
    """
    chosen = trace.sequences if sequences is None else [trace.sequences[i] for i in sequences]
    replayer = Replayer(trace.meta, policy, capacity, cost, prefill=prefill, warm=warm)
    if fast and replayer.cache.routes_in_kernel:
        return kernel_replay(replayer, chosen)[0]
    router = compiled_router(policy)
    if fast and router is not None:
        return kernel_replay(replayer, chosen, router)[0]
    if warm:
        replayer.begin_stream(chosen)
    for sequence in chosen:
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            replayer.process(routing)
    return replayer.tally()


def compiled_router(policy: Policy) -> CompiledRouter | None:
    """The plug-in's compiled replay of a sequence's events (its ``compiled_router()``, e.g. the set-scorer
    eviction plug-ins'), else None."""
    hook = getattr(policy, "compiled_router", None)
    return hook() if callable(hook) else None


def kernel_replay(replayer: Replayer, sequences: Sequence[SequenceTrace],
                  router: CompiledRouter | None = None) -> tuple[SimTally, EventArrays]:  # fmt: skip
    """Replay `sequences` through the cache kernel (the replayer's cache must route in it: routes_in_kernel, or
    `router` routes each sequence's events: compiled_router): the tally and the events with the kernel's
    per-access and per-request outcomes (acc_out, req_out)."""
    from moe_env.cache_kernel import timeline

    cache, meta, cost = replayer.cache, replayer.meta, replayer.cost
    evict = replayer.policy.evict if isinstance(replayer.policy, CombinedPolicy) else replayer.policy
    belady = cache.ranking == "belady"
    # the kernel knows the future of its built-in parts (belady's next accesses, the oracle's requests)
    replayer.with_oracle = evict.needs_future and not belady
    if replayer.with_oracle and replayer.warm:
        replayer.begin_stream(sequences)
    groups = None if not belady else "stream" if replayer.warm else "sequence"
    events, starts = sim_kernels.sequence_events(sequences, cache, builtin_prefetcher(replayer.policy), groups)
    ready = np.zeros((meta.num_layers, meta.num_experts))
    times = np.zeros(3)
    for index, sequence in enumerate(sequences):
        first, end = int(starts[index]), int(starts[index + 1])
        replayer.begin_sequence(sequence)
        if belady and (index == 0 or not replayer.warm):
            cache.begin_future(events, first, int(starts[-1]) if replayer.warm else end)
        if router is None:
            cache.route_events(events, first, end)
        else:
            router(replayer.policy, cache, events, first, end, sequence, replayer._vocab)
        ready[:] = 0.0
        times[:] = 0.0
        timeline(events.ev, events.acc_off, events.experts, events.req_off, events.req_key, events.acc_out,
                 events.req_out, first, end, meta.num_experts, cost.copy_s, cost.expert_compute_s,
                 cost.layer_compute_s, ready, times)  # fmt: skip
        steps = int((sequence.experts[:, :, 0] >= 0).any(axis=1).sum())
        replayer.record_sequence(float(times[0]), float(times[1]), float(times[2]), steps)
    return replayer.tally(), events
