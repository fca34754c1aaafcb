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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from moe_env.cache import Counters, ExpertCacheState, Plan
from moe_env.costmodel import (
    AS_RECORDED,
    DEFAULT_PROFILE,
    EXPERT_PROFILES,
    CostModel,
    recorded_experts,
    resolve_profile,
)
from moe_env.errors import UsageError
from moe_env.policy import ModelSpec, Policy, build_policy
from moe_env.routing import LayerRouting, route_events
from moe_env.sim_kernels import KERNELS, Kernel, layer_events
from moe_env.trace import SequenceTrace, Trace, TraceMeta


class TraceOracle:
    """The future of one sequence, in the clock numbering of ExpertCacheState (one tick per access, route order).

    Built by walking the exact RouteEvents the replay will route (prefill chunking depends on `capacity`).
    """

    def __init__(self, sequence: SequenceTrace, num_layers: int, num_experts: int, capacity: int):
        layers: list[np.ndarray] = []
        experts: list[np.ndarray] = []
        clock = 0
        if sequence.prefill_experts is not None and len(sequence.prefill_experts):
            for routing in sequence.routings():
                if not routing.prefill:
                    break
                for event in route_events(routing, capacity):
                    layers.append(np.full(len(event.experts), event.layer))
                    experts.append(np.asarray(event.experts))
                    clock += len(event.experts)
        # decode: one event per present cell, step-major then layer, k accesses each (SequenceTrace.routings order)
        cells = sequence.experts
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
        self._experts = sequence.experts
        self._num_steps, self._num_layers = sequence.experts.shape[0], sequence.experts.shape[1]

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
    capacity: int
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

    def as_dict(self) -> dict:
        return asdict(self)


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


def check_capacity(meta: TraceMeta, capacity: int) -> None:
    if not meta.top_k <= capacity <= meta.num_experts:
        raise UsageError(
            f"cache slots {capacity} outside {meta.top_k}..{meta.num_experts} "
            f"(a layer must hold its top-{meta.top_k} experts at once)"
        )


class Replayer:
    """Stepwise replay: ``begin_sequence(seq)``, ``process(routing)`` per LayerRouting, ``finish() -> SimResult``.

    ``cache`` (ExpertCacheState) is public and read-only for callers: it is the CacheView policies see. The
    oracle is built per sequence when the policy needs the future or ``with_oracle`` is set.
    """

    def __init__(
        self, meta: TraceMeta, policy: Policy, capacity: int, cost: CostModel, with_oracle: bool = False
    ) -> None:
        check_capacity(meta, capacity)
        self.meta = meta
        self.spec = model_spec(meta, cost.expert_bytes)
        self.cost = cost
        self.policy = policy
        self.capacity = capacity
        self.with_oracle = with_oracle or policy.needs_future
        policy.bind_cost_model(cost)
        self.cache = ExpertCacheState(self.spec, capacity, policy)
        self._copy_s = cost.copy_s
        self._expert_s = cost.expert_compute_s
        self._layer_s = cost.layer_compute_s
        self._decode_tokens = 0
        self._stall_s = 0.0
        self._prefill_stall_s = 0.0
        self._decode_time_s = 0.0
        self._begin_timeline()

    def _begin_timeline(self) -> None:
        self._now = 0.0  # compute timeline of the current sequence
        self._link_free = 0.0  # when the FIFO link finishes its queued copies
        self._ready = [[0.0] * self.meta.num_experts for _ in range(self.meta.num_layers)]  # copy landed at
        self._last_step = -2

    def begin_sequence(self, sequence: SequenceTrace | None = None) -> None:
        """Empty the cache and reset the policy; the oracle (when needed) is built from `sequence`."""
        oracle = None
        if self.with_oracle:
            if sequence is None:
                raise UsageError(f"policy {self.policy.name!r} reads the future: pass the sequence to replay")
            oracle = TraceOracle(sequence, self.meta.num_layers, self.meta.num_experts, self.capacity)
        self.cache.oracle = oracle
        self.cache.begin_sequence()
        self._begin_timeline()

    @property
    def link_backlog_s(self) -> float:
        return max(0.0, self._link_free - self._now)

    def process(self, routing: LayerRouting) -> LayerOutcome:
        """Route one layer's forward pass through the cache and advance the timeline."""
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
        for event in route_events(routing, self.capacity):
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

    def finish(self) -> SimResult:
        """Close the accounting (unused prefetches become wasted) and return the metrics so far."""
        self.cache.finish()
        return _result(
            self.policy.name,
            self.capacity,
            self.cost.name,
            self.cache.counters,
            self._decode_tokens,
            self._stall_s,
            self._prefill_stall_s,
            self._decode_time_s,
        )


def _result(
    policy: str,
    capacity: int,
    profile: str,
    c: Counters,
    tokens: int,
    stall_s: float,
    prefill_stall_s: float,
    decode_time_s: float,
) -> SimResult:
    return SimResult(
        policy=policy,
        capacity=capacity,
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
    )


def simulate(
    trace: Trace,
    policy: str | Policy,
    capacity: int,
    profile: str | CostModel | None = None,
    prefetch: str | Policy | None = None,
    fast: bool = True,
) -> SimResult:
    """Replay every sequence of `trace` through `policy` (+ `prefetch`) with `capacity` slots per layer.

    Demand-only runs of the built-in lru/lfu/fifo/belady take moe_env.sim_kernels' exact fast path unless
    ``fast=False``; everything else goes through Replayer (ExpertCacheState.route).
    """
    cost = cost_model_for(trace.meta, profile)
    built = build_policy(policy, prefetch)
    kernel = type(built).__dict__.get("replay_kernel")  # declared by the class itself, never inherited
    if fast and kernel in KERNELS:
        return _fast_simulate(trace, built, KERNELS[kernel], capacity, cost)
    replayer = Replayer(trace.meta, built, capacity, cost)
    for sequence in trace.sequences:
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            replayer.process(routing)
    return replayer.finish()


def event_time(hits: Sequence[int], copy_s: float, expert_s: float) -> tuple[float, float]:
    """(stall, duration) of one event when the link is idle as it starts: the Replayer's timing, demand-only."""
    t = stall = 0.0
    loads = 0
    for hit in hits:
        if not hit:
            loads += 1
            landed = loads * copy_s
            if landed > t:
                stall += landed - t
                t = landed
        t += expert_s
    return stall, t


def _fast_simulate(trace: Trace, policy: Policy, kernel: Kernel, capacity: int, cost: CostModel) -> SimResult:
    meta = trace.meta
    check_capacity(meta, capacity)
    k, copy_s, expert_s, layer_s = meta.top_k, cost.copy_s, cost.expert_compute_s, cost.layer_compute_s
    weights = 1 << np.arange(k)
    patterns = [event_time([(code >> j) & 1 for j in range(k)], copy_s, expert_s) for code in range(1 << k)]
    pattern_stall, pattern_time = (np.array(x) for x in zip(*patterns, strict=True))
    hits = misses = prefill_hits = prefill_misses = evictions = tokens = cells = 0
    stall = prefill_stall = decode_time = 0.0
    for sequence in trace.sequences:
        present = sequence.experts[:, :, 0] >= 0
        tokens += int(present.any(axis=1).sum())
        cells += int(present.sum())
        for layer in range(meta.num_layers):
            prefill, decode = layer_events(sequence, layer, capacity)
            flags = bytearray()
            evictions += kernel(prefill + decode, capacity, meta.num_experts, flags)
            at = 0
            for event in prefill:  # variable sizes: timed one by one
                event_flags = flags[at : at + len(event)]
                at += len(event)
                prefill_stall += event_time(event_flags, copy_s, expert_s)[0]
                prefill_hits += sum(event_flags)
                prefill_misses += len(event) - sum(event_flags)
            decode_flags = np.frombuffer(bytes(flags[at:]), dtype=np.uint8).reshape(-1, k)
            counts = np.bincount(decode_flags @ weights, minlength=1 << k)
            stall += float(counts @ pattern_stall)
            decode_time += float(counts @ pattern_time)
            layer_hits = int(decode_flags.sum())
            hits += layer_hits
            misses += decode_flags.size - layer_hits
    decode_time += cells * layer_s
    counters = Counters(hits, misses, prefill_hits, prefill_misses, 0, 0, 0, evictions)
    counters.bytes_moved = (misses + prefill_misses) * cost.expert_bytes
    return _result(policy.name, capacity, cost.name, counters, tokens, stall, prefill_stall, decode_time)
