"""A replay's events as the cache kernel's arrays (moe_env.cache.EventArrays), built with numpy per sequence.

The events are exactly those ``route_events`` yields for ``SequenceTrace.routings()`` through the cache (prefill:
per layer the prompt's expert union, grouped as the cache's ``prefill_groups`` says; decode: one event per
present cell, step-major), with the flags the kernel counts by. A built-in prefetcher's requests are the same
function of the trace as its ``prefetch`` (declared by ``replay_prefetch``): lookahead, the top-k of the next
layer's lookahead logits (argsort of minus the float64 logits, stable); oracle, the experts of the next cell.
tests/test_sim_kernels.py checks every built-in policy x prefetcher against routing event by event.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_env.allocation import Allocation
from moe_env.cache import FIRST_TOKENS, EventArrays, ExpertCacheState, chunk_experts
from moe_env.policy import ModelSpec, Policy
from moe_env.trace import SequenceTrace

PREFILL, BYPASS, FIRST, NEW_ROUTING = 1, 2, 4, 8  # moe_env.cache_kernel's event flags
NEVER = 2**62  # moe_env.cache_kernel.NEVER: no next access


def _has_prefill(seq: SequenceTrace) -> bool:
    return seq.prefill_experts is not None and len(seq.prefill_experts) > 0


def _prefetch_keys(seq: SequenceTrace, steps, layers, prefetcher: Policy | None, spec: ModelSpec, capacity: int):
    """[n, k] request keys per decode event and [n] whether the event requests them (built-in prefetchers)."""
    num_layers, num_experts = spec.num_layers, spec.num_experts
    kind = None if prefetcher is None else type(prefetcher).__dict__.get("replay_prefetch")
    if kind == "lookahead":
        k = min(getattr(prefetcher, "k", None) or spec.top_k, capacity)
        valid = layers + 1 < num_layers
        if seq.lookahead_logits is None or not valid.any():
            return np.zeros((len(steps), 0), dtype=np.int64), np.zeros(len(steps), dtype=bool)
        logits = np.asarray(seq.lookahead_logits[steps[valid], layers[valid]], dtype=np.float64)
        keys = np.zeros((len(steps), k), dtype=np.int64)
        keys[valid] = np.argsort(-logits, axis=1, kind="stable")[:, :k] + ((layers[valid] + 1) * num_experts)[:, None]
        return keys, valid
    if kind == "affinity":  # slots only: the kernel writes the requests from the prefetcher's table
        k = min(getattr(prefetcher, "k", None) or spec.top_k, capacity)
        return np.zeros((len(steps), k), dtype=np.int64), layers + 1 < num_layers
    if kind == "oracle":
        target_step = np.where(layers + 1 < num_layers, steps, steps + 1)
        target_layer = np.where(layers + 1 < num_layers, layers + 1, 0)
        valid = target_step < seq.num_steps
        cells = np.full((len(steps), seq.experts.shape[2]), -1, dtype=np.int64)
        cells[valid] = seq.experts[target_step[valid], target_layer[valid]]
        valid &= cells[:, 0] >= 0
        return cells + (target_layer * num_experts)[:, None], valid
    return np.zeros((len(steps), 0), dtype=np.int64), np.zeros(len(steps), dtype=bool)


def sequence_events(
    sequences: Sequence[SequenceTrace], cache: ExpertCacheState, prefetcher: Policy | None, groups: str | None
) -> tuple[EventArrays, np.ndarray]:
    """(events of every sequence in route order, sequence start indices [n + 1]). ``groups``: "sequence" or
    "stream": the span within which belady's next access is looked up (cold: a sequence; warm: the stream);
    None: no next accesses (``following``)."""
    spec = cache.spec
    num_experts = spec.num_experts
    ev, experts, lengths, req_keys, req_counts, starts = [], [], [], [], [], [0]
    for seq in sequences:
        prefill_events = 0
        if _has_prefill(seq):
            for layer in range(spec.num_layers):
                union = np.unique(np.asarray(seq.prefill_experts[:, layer])).tolist()
                chunks, bypass = cache.prefill_groups(layer, union)
                for index, group in enumerate(chunks):
                    flag = PREFILL | (BYPASS if bypass else 0) | (NEW_ROUTING if index == 0 else 0)
                    ev.append(np.asarray([[layer, -1, flag]], dtype=np.int64))
                    experts.append(np.asarray(group, dtype=np.int64))
                    lengths.append(np.asarray([len(group)], dtype=np.int64))
                    req_counts.append(np.zeros(1, dtype=np.int64))
                    prefill_events += 1
        present = seq.experts[:, :, 0] >= 0
        steps, layers = np.divmod(np.flatnonzero(present), present.shape[1])
        # compress: a 2-D boolean index of the 3-D array takes numpy's slow path (10x here)
        cells = seq.experts.reshape(-1, seq.experts.shape[2]).compress(present.reshape(-1), axis=0).astype(np.int64)
        rows = np.empty((len(steps), 3), dtype=np.int64)
        rows[:, 0], rows[:, 1] = layers, steps
        rows[:, 2] = NEW_ROUTING | np.where(steps < FIRST_TOKENS, FIRST, 0)
        ev.append(rows)
        experts.append(cells.reshape(-1))
        lengths.append(np.full(len(steps), cells.shape[1], dtype=np.int64))
        keys, valid = _prefetch_keys(seq, steps, layers, prefetcher, spec, cache.capacity)
        req_keys.append(keys[valid].reshape(-1))
        req_counts.append(np.where(valid, keys.shape[1], 0))
        starts.append(starts[-1] + prefill_events + len(steps))
    ev_all = np.concatenate(ev) if ev else np.zeros((0, 3), dtype=np.int64)
    acc_off = np.concatenate([[0], np.cumsum(np.concatenate(lengths) if lengths else [])]).astype(np.int64)
    req_off = np.concatenate([[0], np.cumsum(np.concatenate(req_counts) if req_counts else [])]).astype(np.int64)
    flat = np.concatenate(experts) if experts else np.zeros(0, dtype=np.int64)
    req_key = np.concatenate(req_keys) if req_keys else np.zeros(0, dtype=np.int64)
    events = EventArrays(
        ev=ev_all,
        acc_off=acc_off,
        experts=flat,
        req_off=req_off,
        req_key=req_key.astype(np.int64),
        acc_out=np.zeros((len(flat), 3), dtype=np.int64),
        req_out=np.zeros((len(req_key), 2), dtype=np.int64),
    )
    seq_start = np.asarray(starts, dtype=np.int64)
    if groups is not None:
        events.following = following(events, seq_start if groups == "sequence" else seq_start[[0, -1]], num_experts)
    return events, seq_start


def following(events: EventArrays, group_start: np.ndarray, num_experts: int) -> np.ndarray:
    """Per access the index of the next access of the same key within its group of events (NEVER if none)."""
    from moe_env.cache_kernel import next_accesses  # compiled: numba is imported by the first cache

    result = np.empty(len(events.experts), dtype=np.int64)
    next_accesses(events.ev, events.acc_off, events.experts, np.asarray(group_start, dtype=np.int64), num_experts,
                  result)  # fmt: skip
    return result


def layer_events(sequence: SequenceTrace, layer: int, capacity: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prefill events, decode events) of one layer as lists, in route order (moe_env.analysis reads them)."""
    prefill = []
    if _has_prefill(sequence):
        prefill = [list(g) for g in chunk_experts(np.unique(sequence.prefill_experts[:, layer]).tolist(), capacity)]
    rows = sequence.experts[:, layer]
    return prefill, rows[rows[:, 0] >= 0].tolist()


def lru_kernel(events: list[list[int]], capacity: int, num_experts: int, hits: bytearray) -> int:
    """One cache of `capacity` slots under LRU over a list of events (through the cache kernel): hit flags
    appended to `hits`; returns the evictions."""
    from moe_env.policies.lru import LRUPolicy

    width = max((len(e) for e in events), default=1)
    spec = ModelSpec(num_layers=1, num_experts=num_experts, top_k=max(1, min(width, capacity)))
    cache = ExpertCacheState(spec, Allocation.uniform(1, num_experts, capacity), LRUPolicy())
    lengths = np.asarray([len(e) for e in events], dtype=np.int64)
    flat = np.asarray([k for e in events for k in e], dtype=np.int64)
    arrays = EventArrays(
        ev=np.zeros((len(events), 3), dtype=np.int64),
        acc_off=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        experts=flat,
        req_off=np.zeros(len(events) + 1, dtype=np.int64),
        req_key=np.zeros(0, dtype=np.int64),
        acc_out=np.zeros((len(flat), 3), dtype=np.int64),
        req_out=np.zeros((0, 2), dtype=np.int64),
    )
    cache.route_events(arrays, 0, len(events))
    hits += (arrays.acc_out[:, 0] & 1).astype(np.uint8).tobytes()
    return cache.counters.evictions
