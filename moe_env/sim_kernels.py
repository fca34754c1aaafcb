"""Fast replay of demand-only runs for the built-in scorers (lru, lfu, fifo, belady): same decisions, ~10x faster.

Without prefetch, each layer's cache evolves independently of the other layers (no request crosses layers) and
the copy link is idle whenever a layer starts (a layer waits for all its demand loads), so a replay decomposes
into one tight loop per (sequence, layer) plus a timing that depends only on each event's hit pattern.

Each kernel reproduces ExpertCacheState's choice exactly: candidates are the residents not needed by the current
event; the victim has the lowest score, ties to the least recent use. Within a layer the cache's global clock
orders accesses as the layer's own access index does, and every resident has a distinct last use, so:
lru = oldest last use; fifo = oldest load; lfu = fewest uses this sequence, then oldest last use;
belady = farthest next use, never-again first, then oldest last use. tests/test_sim.py checks every kernel
against the general path on real routing.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import numpy as np

from moe_env.allocation import Allocation
from moe_env.cache import chunk_experts
from moe_env.trace import SequenceTrace

Events = list[list[int]]
Kernel = Callable[[Events, int, int, bytearray], int]  # (events, capacity, num_experts, hit flags out) -> evictions
Segment = tuple[int, int, int]  # per sequence: (prefill events, decode events, decode events of the first steps)


def layer_events(sequence: SequenceTrace, layer: int, capacity: int) -> tuple[Events, Events]:
    """(prefill events, decode events) of one layer, in route order (as moe_env.routing.route_events makes them)."""
    prefill: Events = []
    if sequence.prefill_experts is not None and len(sequence.prefill_experts):
        union = sorted({int(e) for e in np.asarray(sequence.prefill_experts[:, layer]).reshape(-1)})
        prefill = [list(group) for group in chunk_experts(union, capacity)]
    rows = sequence.experts[:, layer]
    decode = rows[rows[:, 0] >= 0].tolist()
    return prefill, decode


def stream_events(
    sequences: Sequence[SequenceTrace], allocation: Allocation, first_steps: int
) -> tuple[Events, list[Segment]]:
    """Every layer's events as one stream of keys layer * E + expert, in route order (a shared pool's view):
    per sequence, prefill layer by layer (chunked to the layer's slots), then decode step by step."""
    events: Events = []
    segments: list[Segment] = []
    for seq in sequences:
        num_layers, num_experts = seq.experts.shape[1], allocation.num_experts
        n_prefill = 0
        if seq.prefill_experts is not None and len(seq.prefill_experts):
            for layer in range(num_layers):
                union = sorted({int(e) for e in np.asarray(seq.prefill_experts[:, layer]).reshape(-1)})
                base = layer * num_experts
                for group in chunk_experts(union, allocation.layer_slots(layer)):
                    events.append([base + e for e in group])
                    n_prefill += 1
        present = seq.experts[:, :, 0] >= 0
        keys = seq.experts + (np.arange(num_layers) * num_experts)[None, :, None]
        decode = keys[present].tolist()  # step-major, then layer: SequenceTrace.routings order
        events += decode
        segments.append((n_prefill, len(decode), int(present[:first_steps].sum())))
    return events, segments


def _heap_kernel(events: Events, capacity: int, num_keys: int, hits: bytearray, rank: Callable) -> int:
    """A large pool (a shared one holds hundreds of slots): the lowest `rank(key, clock, index)` is evicted,
    found through a heap with stale entries skipped, as the per-layer kernels' linear scans would find it."""
    current = [0] * num_keys  # the rank each resident was last pushed with
    resident = bytearray(num_keys)
    heap: list[tuple[int, int]] = []
    count = evictions = clock = 0
    for event in events:
        for key in event:
            clock += 1
            if resident[key]:
                hits.append(1)
            else:
                if count >= capacity:
                    aside = []
                    while True:
                        value, victim = heapq.heappop(heap)
                        if not resident[victim] or current[victim] != value:
                            continue  # stale
                        if victim in event:
                            aside.append((value, victim))
                            continue
                        break
                    for item in aside:
                        heapq.heappush(heap, item)
                    resident[victim] = 0
                    count -= 1
                    evictions += 1
                resident[key] = 1
                count += 1
                hits.append(0)
            value = rank(key, clock, clock - 1)
            if value != current[key] or not hits[-1]:
                current[key] = value
                heapq.heappush(heap, (value, key))
    return evictions


def shared_lru(events: Events, capacity: int, num_keys: int, hits: bytearray) -> int:
    return _heap_kernel(events, capacity, num_keys, hits, lambda key, clock, index: clock)


def shared_fifo(events: Events, capacity: int, num_keys: int, hits: bytearray) -> int:
    loaded: dict[int, int] = {}

    def rank(key: int, clock: int, index: int) -> int:
        if not hits[-1]:
            loaded[key] = clock
        return loaded[key]

    return _heap_kernel(events, capacity, num_keys, hits, rank)


def shared_lfu(events: Events, capacity: int, num_keys: int, hits: bytearray) -> int:
    stride = 1 + sum(len(e) for e in events)
    uses = [0] * num_keys

    def rank(key: int, clock: int, index: int) -> int:
        uses[key] += 1
        return uses[key] * stride + clock

    return _heap_kernel(events, capacity, num_keys, hits, rank)


def shared_belady(events: Events, capacity: int, num_keys: int, hits: bytearray) -> int:
    flat = [key for event in events for key in event]
    never = len(flat) + 1
    following = [never] * len(flat)
    seen = [never] * num_keys
    for i in range(len(flat) - 1, -1, -1):
        following[i] = seen[flat[i]]
        seen[flat[i]] = i
    stride = never + 1
    return _heap_kernel(
        events, capacity, num_keys, hits, lambda key, clock, index: -(following[index] * stride - index)
    )


def lru_kernel(events: Events, capacity: int, num_experts: int, hits: bytearray) -> int:
    recency: list[int] = []  # residents, least recently used first (a short list beats a dict here)
    evictions = 0
    for event in events:
        for expert in event:
            if expert in recency:
                recency.remove(expert)
                recency.append(expert)
                hits.append(1)
                continue
            if len(recency) >= capacity:
                for victim in recency:
                    if victim not in event:
                        break
                recency.remove(victim)
                evictions += 1
            recency.append(expert)
            hits.append(0)
    return evictions


def fifo_kernel(events: Events, capacity: int, num_experts: int, hits: bytearray) -> int:
    arrival: dict[int, None] = {}  # residents, loaded first first
    evictions = 0
    for event in events:
        for expert in event:
            if expert in arrival:
                hits.append(1)
                continue
            if len(arrival) >= capacity:
                for victim in arrival:
                    if victim not in event:
                        break
                del arrival[victim]
                evictions += 1
            arrival[expert] = None
            hits.append(0)
    return evictions


def lfu_kernel(events: Events, capacity: int, num_experts: int, hits: bytearray) -> int:
    # key = uses * stride + last use: lowest key = fewest uses, then least recent (last uses are distinct)
    stride = 1 + sum(len(e) for e in events)
    key = [0] * num_experts
    resident: list[int] = []
    evictions = 0
    clock = 0
    for event in events:
        for expert in event:
            clock += 1
            if expert in resident:
                hits.append(1)
            else:
                if len(resident) >= capacity:
                    victim, lowest = -1, None
                    for e in resident:  # an explicit loop: cheaper than min() over a generator
                        if e not in event and (lowest is None or key[e] < lowest):
                            victim, lowest = e, key[e]
                    resident.remove(victim)
                    evictions += 1
                resident.append(expert)
                hits.append(0)
            key[expert] = (key[expert] // stride + 1) * stride + clock
    return evictions


def belady_kernel(events: Events, capacity: int, num_experts: int, hits: bytearray) -> int:
    flat = [expert for event in events for expert in event]
    never = len(flat) + 1
    following = [never] * len(flat)  # index of the next access of the same expert
    seen = [never] * num_experts
    for i in range(len(flat) - 1, -1, -1):
        following[i] = seen[flat[i]]
        seen[flat[i]] = i
    # key = next use * stride - last use: highest key = farthest next use, then least recent
    stride = never + 1
    key = [0] * num_experts
    resident: list[int] = []
    evictions = 0
    i = 0
    for event in events:
        for expert in event:
            if expert in resident:
                hits.append(1)
            else:
                if len(resident) >= capacity:
                    victim, highest = -1, -1
                    for e in resident:
                        if e not in event and key[e] > highest:
                            victim, highest = e, key[e]
                    resident.remove(victim)
                    evictions += 1
                resident.append(expert)
                hits.append(0)
            key[expert] = following[i] * stride - i
            i += 1
    return evictions


KERNELS: dict[str, Kernel] = {"lru": lru_kernel, "fifo": fifo_kernel, "lfu": lfu_kernel, "belady": belady_kernel}
SHARED_KERNELS: dict[str, Kernel] = {"lru": shared_lru, "fifo": shared_fifo, "lfu": shared_lfu, "belady": shared_belady}
