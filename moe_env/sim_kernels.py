"""Fast replay of demand-only runs for the built-in scorers (lru, lfu, fifo, belady): same decisions, compiled.

Without prefetch, each pool's cache evolves independently of the others (no request crosses pools) and the
copy link is idle whenever a layer starts (a layer waits for all its demand loads), so a replay decomposes into
one tight loop per independent cache (a *segment*: one (sequence, layer) of a per-layer pool, one sequence of a
shared pool; warm: the whole stream instead of one sequence) plus a timing that depends only on each event's hit
pattern. The events are int arrays in CSR form (``offsets`` into ``keys``), built here with numpy; the loops are
numba functions in moe_env.replay_jit (compiled on first use, the machine code cached in __pycache__).

Each kernel reproduces ExpertCacheState's choice exactly: candidates are the residents not needed by the current
event; the victim has the lowest rank. Within a segment the cache's global clock orders accesses as the
segment's own access index does, and every resident has a distinct last use, so ranks are (primary, last use)
pairs: lru = last use; fifo = load time; lfu = uses since the segment began (evicted or not), then last use;
belady = minus the index of the next access (never again: the lowest), then last use. tests/test_sim.py and
tests/test_allocation.py check every kernel against the general path on real and random routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moe_env.allocation import Allocation
from moe_env.cache import chunk_experts
from moe_env.trace import SequenceTrace

KINDS = {"lru": 0, "fifo": 1, "lfu": 2, "belady": 3}  # the scorers with a kernel (Policy.replay_kernel)


@dataclass
class Events:
    """A replay's events as CSR int arrays, grouped into segments (independent caches), route order within each.

    keys[offsets[i]:offsets[i + 1]] are event i's keys (expert ids of a per-layer pool, layer * E + expert in a
    shared one); segment j is events seg_start[j]..seg_start[j + 1] - 1 with seg_capacity[j] slots. Per event:
    the sequence it belongs to (index into the replayed list), whether it is prefill, and whether it is a decode
    event of the first steps (counted apart: cache.FIRST_TOKENS)."""

    keys: np.ndarray  # int64 [accesses]
    offsets: np.ndarray  # int64 [events + 1]
    seg_start: np.ndarray  # int64 [segments + 1]
    seg_capacity: np.ndarray  # int64 [segments]
    num_keys: int
    sequence: np.ndarray  # int64 [events]
    prefill: np.ndarray  # bool [events]
    first: np.ndarray  # bool [events]


def _has_prefill(seq: SequenceTrace) -> bool:
    return seq.prefill_experts is not None and len(seq.prefill_experts) > 0


def _prefill_groups(seq: SequenceTrace, layer: int, slots: int) -> list[tuple[int, ...]]:
    if not _has_prefill(seq):
        return []
    return chunk_experts(np.unique(np.asarray(seq.prefill_experts[:, layer])).tolist(), slots)


class _Builder:
    """Events appended as chunks of equal-length events (one numpy array [n, width] each), then ordered."""

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.order: list[np.ndarray] = []  # the segment each event belongs to (sorted on, stably)
        self.sequence: list[np.ndarray] = []
        self.prefill: list[np.ndarray] = []
        self.first: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []

    def add(self, keys: np.ndarray, segment: np.ndarray | int, sequence: int, prefill: bool, first) -> None:
        """`keys` [n, width]: n events of `width` keys; `segment` one per event (or one for all)."""
        n = len(keys)
        if n == 0:
            return
        self.keys.append(keys.reshape(n, -1).astype(np.int64))
        self.order.append(np.full(n, segment, dtype=np.int64) if np.isscalar(segment) else segment)
        self.sequence.append(np.full(n, sequence, dtype=np.int64))
        self.prefill.append(np.full(n, prefill))
        self.first.append(np.full(n, first) if np.isscalar(first) else first)
        self.lengths.append(np.full(n, keys.shape[1] if keys.ndim > 1 else 1, dtype=np.int64))

    def build(self, capacities: np.ndarray, num_keys: int) -> Events:
        if not self.keys:
            empty = np.zeros(0, dtype=np.int64)
            return Events(empty, np.zeros(1, np.int64), np.zeros(1, np.int64), empty, num_keys, empty,
                          np.zeros(0, bool), np.zeros(0, bool))  # fmt: skip
        segment = np.concatenate(self.order)
        lengths = np.concatenate(self.lengths)
        events = np.argsort(segment, kind="stable")  # segments in order, route order kept within each
        flat = np.concatenate([k.reshape(-1) for k in self.keys])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        offsets = np.zeros(len(events) + 1, dtype=np.int64)
        np.cumsum(lengths[events], out=offsets[1:])
        # the keys of the reordered events: each event's own run of keys, gathered in the new order
        take = np.repeat(starts[events] - offsets[:-1], lengths[events]) + np.arange(offsets[-1])
        seg_start = np.searchsorted(segment[events], np.arange(len(capacities) + 1))
        return Events(
            keys=flat[take],
            offsets=offsets,
            seg_start=seg_start.astype(np.int64),
            seg_capacity=np.asarray(capacities, dtype=np.int64),
            num_keys=num_keys,
            sequence=np.concatenate(self.sequence)[events],
            prefill=np.concatenate(self.prefill)[events],
            first=np.concatenate(self.first)[events],
        )


def pool_events(sequences: Sequence[SequenceTrace], allocation: Allocation, first_steps: int, warm: bool) -> Events:
    """Per-layer pools: one segment per (sequence, layer) (warm: per layer, the whole stream), keys = expert ids;
    in a segment the sequence's prefill groups of that layer (chunked to its slots), then its decode events."""
    num_layers = allocation.num_layers
    slots = [allocation.layer_slots(layer) for layer in range(num_layers)]
    builder = _Builder()
    for index, seq in enumerate(sequences):
        base = 0 if warm else index * num_layers
        for layer in range(num_layers) if _has_prefill(seq) else ():
            for group in _prefill_groups(seq, layer, slots[layer]):  # one at a time: the last may be shorter
                builder.add(np.asarray([group]), base + layer, index, True, False)
        cells = np.swapaxes(seq.experts, 0, 1)  # [L, T, k]: layer-major, steps in order
        present = cells[:, :, 0] >= 0
        layer_of, step_of = np.nonzero(present)
        builder.add(cells[present], base + layer_of, index, False, step_of < first_steps)
    segments = num_layers if warm else num_layers * len(sequences)
    return builder.build(np.tile(slots, segments // num_layers), allocation.num_experts)


def stream_events(sequences: Sequence[SequenceTrace], allocation: Allocation, first_steps: int, warm: bool) -> Events:
    """A shared pool: every layer's events as one stream of keys layer * E + expert in route order, one segment
    per sequence (warm: one for the stream); per sequence, prefill layer by layer (chunked to the layer's
    slots), then decode step by step (SequenceTrace.routings order)."""
    num_layers, num_experts = allocation.num_layers, allocation.num_experts
    builder = _Builder()
    for index, seq in enumerate(sequences):
        segment = 0 if warm else index
        for layer in range(num_layers) if _has_prefill(seq) else ():
            for group in _prefill_groups(seq, layer, allocation.layer_slots(layer)):
                builder.add(np.asarray([group]) + layer * num_experts, segment, index, True, False)
        present = seq.experts[:, :, 0] >= 0
        keys = seq.experts.astype(np.int64) + (np.arange(num_layers) * num_experts)[None, :, None]
        step_of = np.nonzero(present)[0]
        builder.add(keys[present], segment, index, False, step_of < first_steps)
    capacities = np.full(1 if warm else len(sequences), allocation.total_slots)
    return builder.build(capacities, num_layers * num_experts)


def replay_hits(kind: str, events: Events) -> tuple[np.ndarray, int]:
    """(hit flags uint8 [accesses], evictions) of `events` under the scorer `kind` (a key of KINDS)."""
    from moe_env.replay_jit import replay  # numba is imported on the first fast replay only (~1 s)

    hits = np.zeros(len(events.keys), dtype=np.uint8)
    evictions = replay(KINDS[kind], events.keys, events.offsets, events.seg_start, events.seg_capacity,
                       events.num_keys, hits)  # fmt: skip
    return hits, int(evictions)


def event_times(
    events: Events, hits: np.ndarray, copy_s: float, expert_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hits int64, stall float64, duration float64) per event of `events`, given their accesses' hit flags."""
    from moe_env.replay_jit import event_times as times

    count = len(events.offsets) - 1
    event_hits, stall, duration = np.zeros(count, dtype=np.int64), np.zeros(count), np.zeros(count)
    times(events.offsets, hits, float(copy_s), float(expert_s), event_hits, stall, duration)
    return event_hits, stall, duration


def layer_events(sequence: SequenceTrace, layer: int, capacity: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prefill events, decode events) of one layer as lists, in route order (moe_env.analysis reads them)."""
    prefill = [list(group) for group in _prefill_groups(sequence, layer, capacity)]
    rows = sequence.experts[:, layer]
    return prefill, rows[rows[:, 0] >= 0].tolist()


def lru_kernel(events: list[list[int]], capacity: int, num_experts: int, hits: bytearray) -> int:
    """One cache of `capacity` slots under LRU over a list of events: hit flags appended to `hits`; evictions."""
    lengths = np.asarray([len(e) for e in events], dtype=np.int64)
    offsets = np.zeros(len(events) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    keys = np.asarray([k for e in events for k in e], dtype=np.int64)
    none = np.zeros(len(events), dtype=np.int64)
    one = Events(keys, offsets, np.asarray([0, len(events)]), np.asarray([capacity]), num_experts, none,
                 none.astype(bool), none.astype(bool))  # fmt: skip
    flags, evictions = replay_hits("lru", one)
    hits += flags.tobytes()
    return evictions
