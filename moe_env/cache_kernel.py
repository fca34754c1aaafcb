"""The cache's rules as one compiled loop (numba, ``cache=True``): what ExpertCacheState.route does per access.

Imported by ExpertCacheState on construction, never at ``import moe_env`` (numba costs about a second to import).
``advance`` walks events in CSR form (``acc_off`` into ``experts``, ``req_off`` into ``req_key``) from
``cursor[0]`` to ``ev_to`` over the state arrays that ExpertCacheState owns (the same memory its CacheView rows
show policies), and stops where Python must act:

- ``NEED_VICTIM``: a slot must be freed and the ranking is the plug-in's own (``RANK_PYTHON``): the candidates
  (keys layer * E + expert, ascending) are in ``cand[:cursor[4]]``; call again with the chosen key as ``victim``;
- ``NEED_PREFETCH``: the event's accesses are done and the plug-in prefetches from Python (``python_prefetch``):
  call again with that event's requests in ``req_off``/``req_key``;
- ``DONE``: ``cursor[0] == ev_to``.

A built-in ranking (RANK_LRU, _FIFO, _LFU, _DECAY, _BELADY, _RANDOM, _LFUDA, _SCORES) picks the victim inside the
loop: the lowest (score, last use, key), the order ExpertCacheState documents. lfu-decay and lfuda also run their
plug-in's observe here, on the plug-in's own arrays (``table``; lfuda's ``aging``); RANK_SCORES ranks by ``table``
as given (no observe). The semantics are those of moe_env.cache's module docstring; this is their only
implementation.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

DONE, NEED_VICTIM, NEED_PREFETCH = 0, 1, 2
RANK_PYTHON, RANK_LRU, RANK_FIFO, RANK_LFU, RANK_DECAY, RANK_BELADY, RANK_RANDOM, RANK_LFUDA = 0, 1, 2, 3, 4, 5, 6, 7
RANK_SCORES = 8  # the scores in `table` as given (no observe): the env's action, moe_env.lane_env
# event flags (ev[:, 2])
PREFILL, BYPASS, FIRST, NEW_ROUTING = 1, 2, 4, 8
# scalars: the clock, then the counter deltas in moe_env.cache.Counters' field order, then the event serial
CLOCK, HITS, MISSES, PREFILL_HITS, PREFILL_MISSES, PF_ISSUED, PF_USED, PF_WASTED = 0, 1, 2, 3, 4, 5, 6, 7
EVICTIONS, BYTES, FIRST_HITS, FIRST_MISSES, BYPASS_LOADS = 8, 9, 10, 11, 12
SERIAL, PENDING, AFFINITY_PREVIOUS = 13, 14, 15
NUM_SCALARS = 16  # PENDING: how many (layer, expert) are in flight; AFFINITY_PREVIOUS: the last decode event
NEVER = np.int64(2**62)  # belady: no next access


def _draw(rng):  # pragma: no cover - replaced by the overload below in compiled code
    """One float from `rng` (a numpy Generator); 0.0 for the placeholder array passed when nothing draws."""


@overload(_draw)
def _draw_overload(rng):
    # two specialisations of the kernel: with a Generator (random ranks) or an array (unboxing a Generator costs
    # three ctypes casts per call, which route() would pay per event)
    if isinstance(rng, types.NumPyRandomGeneratorType):
        return lambda rng: rng.random()
    return lambda rng: 0.0


@numba.njit(cache=True, error_model="numpy")
def _candidates(pools, key_in, pool, pending, stamp, serial, allow_in_flight, ordered, cand):  # pragma: no cover
    """Residents of `pool` not protected by this event (ascending if `ordered`: what a Python scorer is handed);
    in-flight ones only if nothing else is left."""
    base, filled = pools[pool, 0], pools[pool, 2]
    for include_in_flight in range(2 if allow_in_flight else 1):
        n = 0
        for s in range(base, base + filled):
            key = key_in[s]
            if key < 0 or stamp[key] == serial:
                continue
            if include_in_flight == 0 and pending[key]:
                continue
            j = n  # insertion sort: a pool holds a handful to a few hundred keys
            while ordered and j > 0 and cand[j - 1] > key:
                cand[j] = cand[j - 1]
                j -= 1
            cand[j] = key
            n += 1
        if n:
            return n
    return 0


@numba.njit(cache=True, error_model="numpy")
def _ranked(rank, cand, n, ints, table, nxt, rng, age, awaiting, span, num_experts):  # pragma: no cover
    """The candidate with the lowest (score, last use, key) under a built-in ranking (state flat per key). Random
    draws one number per candidate in ascending key order from the policy's own generator, as its
    eviction_scores does (numba's Generator advances the same bit generator state). lfuda (policies.lfuda):
    key ``table``, an unused prefetch scores the age; the victim's score becomes its layer's age, and the first
    expert of that layer waiting for an eviction takes age + 1 as its key."""
    best, best_score, best_used = -1, 0.0, 0
    for j in range(n):
        key = cand[j]
        if rank == RANK_LRU:
            score = float(ints[1, key])
        elif rank == RANK_FIFO:
            score = float(ints[3, key])
        elif rank == RANK_LFU:
            score = float(ints[2, key])
        elif rank in (RANK_DECAY, RANK_SCORES):
            score = table[key]
        elif rank == RANK_RANDOM:
            score = _draw(rng)
        elif rank == RANK_LFUDA:
            score = age[key // num_experts] if ints[1, key] < ints[3, key] else table[key]
        else:
            score = -np.inf if nxt[key] >= NEVER else -float(nxt[key])
        used = ints[1, key]
        if (
            best < 0
            or score < best_score
            or (score == best_score and (used < best_used or (used == best_used and key < best)))
        ):
            best, best_score, best_used = key, score, used
    if rank == RANK_LFUDA:
        layer = best // num_experts
        age[layer] = best_score
        if span[layer, 0] < span[layer, 1]:
            table[layer * num_experts + awaiting[layer, span[layer, 0]]] = best_score + 1.0
            span[layer, 0] += 1
    return best


@numba.njit(cache=True, error_model="numpy")
def _lfuda_observe(layer, experts, lo, hi, ints, table, uses, age, awaiting, span, free,
                   num_experts):  # pragma: no cover - compiled  # fmt: skip
    """policies.lfuda's observe at an event's start: a resident's key is age + uses since loaded (a prefetched
    expert's first use counts one); a miss into a free slot, age + 1; the other misses wait for their eviction."""
    span[layer, 0] = 0
    span[layer, 1] = 0
    for i in range(lo, hi):
        key = layer * num_experts + experts[i]
        if ints[0, key] >= 0:
            uses[key] = uses[key] + 1.0 if ints[1, key] >= ints[3, key] else 1.0
            table[key] = age[layer] + uses[key]
        else:
            uses[key] = 1.0
            if free > 0:
                free -= 1
                table[key] = age[layer] + 1.0
            else:
                awaiting[layer, span[layer, 1]] = experts[i]
                span[layer, 1] += 1


@numba.njit(cache=True, error_model="numpy")
def _evict(key, ints, flags, key_in, pools, layer_pool, scalars, num_experts):  # pragma: no cover - compiled
    slot = ints[0, key]
    ints[0, key] = -1
    key_in[pools[layer_pool[key // num_experts], 0] + slot] = -1
    ints[3, key] = -1
    if flags[0, key]:
        flags[0, key] = False
        scalars[PENDING] -= 1
    if flags[1, key]:
        flags[1, key] = False
        scalars[PF_WASTED] += 1
    scalars[EVICTIONS] += 1
    return slot


@numba.njit(cache=True, error_model="numpy")
def _block_sum(a, lo, n):  # pragma: no cover - compiled
    """numpy's pairwise_sum for n <= 128: a plain loop below 8, else eight interleaved accumulators."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@numba.njit(cache=True, error_model="numpy")
def _pairwise_sum(a, n):  # pragma: no cover - compiled
    """numpy's pairwise summation of a[:n] (what ndarray.sum does along a contiguous axis), bit for bit: above 128
    elements the halves (the first a multiple of 8) are summed apart and added. Iterative: numba's cache does not
    take recursive functions."""
    if n <= 128:
        return _block_sum(a, 0, n)
    depth = 64
    los = np.empty(depth, dtype=np.int64)
    sizes = np.empty(depth, dtype=np.int64)
    lefts = np.empty(depth)
    stage = np.zeros(depth, dtype=np.int64)  # 0: left half next, 1: right half next
    los[0], sizes[0], stage[0] = 0, n, 0
    top = 1
    value = 0.0
    have_value = False
    while top > 0:
        f = top - 1
        if have_value:  # a child finished: the left half waits for the right one, the right completes the frame
            if stage[f] == 0:
                lefts[f] = value
                stage[f] = 1
                have_value = False
            else:
                value = lefts[f] + value
                top -= 1
                continue
        half = sizes[f] // 2
        half -= half % 8
        child_lo = los[f] if stage[f] == 0 else los[f] + half
        child_n = half if stage[f] == 0 else sizes[f] - half
        if child_n <= 128:
            value = _block_sum(a, child_lo, child_n)
            have_value = True
        else:
            los[top], sizes[top], stage[top] = child_lo, child_n, 0
            top += 1
    return value


@numba.njit(cache=True, error_model="numpy")
def _affinity_requests(counts, layer, experts, lo, hi, k, num_experts, scratch, out, first):  # pragma: no cover
    """policies.affinity's prefetch: the top k of the mean over the event's experts of their rows of `counts`
    normalised to sum 1 (numpy's order of operations), descending, ties to the lower expert, NaN last."""
    scores, taken = scratch[0], scratch[1]
    for x in range(num_experts):
        scores[x] = 0.0
        taken[x] = 0.0
    for i in range(lo, hi):
        row = counts[layer, experts[i]]
        total = _pairwise_sum(row, num_experts)
        for x in range(num_experts):
            scores[x] += row[x] / total
    for x in range(num_experts):
        scores[x] /= hi - lo
    for j in range(k):
        best = -1
        for x in range(num_experts):
            if taken[x]:
                continue
            if best < 0 or (not np.isnan(scores[x]) and (np.isnan(scores[best]) or scores[x] > scores[best])):
                best = x
        taken[best] = 1.0
        out[first + j] = (layer + 1) * num_experts + best


@numba.njit(cache=True)
def no_aging():  # pragma: no cover - compiled
    """advance's ``aging`` argument for a ranking other than lfuda (for compiled drivers; ExpertCacheState keeps
    its own)."""
    return np.zeros((1, 1)), np.zeros(1), np.zeros((1, 1), dtype=np.int64), np.zeros((1, 2), dtype=np.int64)


@numba.njit(cache=True, error_model="numpy")
def advance(ints, flags, key_in, pools, layer_pool, scalars, stamp, ev, acc_off, experts, req_off, req_key,
            acc_out, req_out, cursor, cand, victim, ev_to, rank, decay, table, aging, following, nxt,
            num_experts, expert_bytes, python_prefetch, counts, affinity_k, scratch,
            rng):  # pragma: no cover - compiled  # fmt: skip
    """Route events cursor[0]..ev_to-1 (see the module docstring). State: ints [4, L, E] (slot, last use, use
    count, load clock), flags [2, L, E] (in flight, prefetched unused), key_in (every pool's slots), pools [P, 3]
    (first slot, size, filled), scalars. Per access acc_out = (1 hit | 2 was in flight, slot, evicted key or -1);
    per request req_out = (slot or -1 when dropped, evicted key or -1). cursor: (event, position, phase, event
    begun, candidates, clock already ticked). ``affinity_k`` > 0: policies.affinity's observe and prefetch on its
    `counts` table [L, E, E], the requests written into the event's req_key slots (k reserved per decode event
    of a layer that has a next one)."""
    # flat per key (layer * E + expert): no division on the hot path
    ints = ints.reshape((4, -1))
    flags = flags.reshape((2, -1))
    table = table.reshape(-1)  # the ranking's scores: lfu-decay's, or lfuda's keys
    uses, age, awaiting, span = aging[0].reshape(-1), aging[1], aging[2], aging[3]
    slot_of, last_use, use_count, loaded_at = ints[0], ints[1], ints[2], ints[3]
    pending, unused = flags[0], flags[1]
    ordered = rank == RANK_PYTHON or rank == RANK_RANDOM  # in the order a Python scorer is handed them: ascending
    while cursor[0] < ev_to:
        e = cursor[0]
        layer, flag = ev[e, 0], ev[e, 2]
        lo, hi = acc_off[e], acc_off[e + 1]
        if cursor[3] == 0:  # the event begins: its own experts are never candidates
            cursor[3] = 1
            cursor[1] = lo
            cursor[2] = 0
            scalars[SERIAL] += 1
            for i in range(lo, hi):
                stamp[layer * num_experts + experts[i]] = scalars[SERIAL]
            if rank == RANK_DECAY:  # lfu-decay's observe: per access, every score of the layer decays
                base = layer * num_experts
                for i in range(lo, hi):
                    for x in range(base, base + num_experts):
                        table[x] *= decay
                    table[base + experts[i]] += 1.0
            elif rank == RANK_LFUDA:  # lfuda's observe; its pools are per layer (it does not rank across layers)
                pool = layer_pool[layer]
                free = min(pools[pool, 1], num_experts) - pools[pool, 2]
                _lfuda_observe(layer, experts, lo, hi, ints, table, uses, age, awaiting, span, free, num_experts)
            if affinity_k > 0 and not flag & PREFILL:  # affinity's observe: co-activation with the layer before
                previous = scalars[AFFINITY_PREVIOUS]
                if previous >= 0 and ev[previous, 1] == ev[e, 1] and ev[previous, 0] == layer - 1:
                    for i in range(acc_off[previous], acc_off[previous + 1]):
                        for j in range(lo, hi):
                            counts[layer - 1, experts[i], experts[j]] += 1.0
                scalars[AFFINITY_PREVIOUS] = e
        serial = scalars[SERIAL]
        if cursor[2] == 0:
            i = cursor[1]
            while i < hi:
                expert = experts[i]
                key = layer * num_experts + expert
                if cursor[5]:  # resumed with a victim: this access's clock has already ticked
                    cursor[5] = 0
                    clock = scalars[CLOCK]
                else:
                    clock = scalars[CLOCK] + 1
                slot = slot_of[key]
                hit = slot >= 0
                if hit:
                    acc_out[i, 0] = 3 if pending[key] else 1
                    acc_out[i, 1] = slot
                    acc_out[i, 2] = -1
                    if unused[key]:
                        unused[key] = False
                        scalars[PF_USED] += 1
                elif flag & BYPASS:
                    acc_out[i, 0] = 0
                    acc_out[i, 1] = -1
                    acc_out[i, 2] = -1
                    scalars[BYPASS_LOADS] += 1
                    scalars[BYTES] += expert_bytes
                else:
                    pool = layer_pool[layer]
                    evicted = -1
                    scalars[CLOCK] = clock  # the victim's scores and the load time see this access's clock
                    if pools[pool, 2] < pools[pool, 1]:
                        slot = pools[pool, 2]
                        pools[pool, 2] += 1
                    else:
                        if victim >= 0:
                            evicted = victim
                            victim = -1
                        else:
                            n = _candidates(pools, key_in, pool, pending, stamp, serial, True, ordered, cand)
                            if rank == RANK_PYTHON:
                                cursor[1], cursor[4], cursor[5] = i, n, 1
                                return NEED_VICTIM
                            evicted = _ranked(rank, cand, n, ints, table, nxt, rng, age, awaiting, span, num_experts)
                        slot = _evict(evicted, ints, flags, key_in, pools, layer_pool, scalars, num_experts)
                    slot_of[key] = slot
                    key_in[pools[pool, 0] + slot] = key
                    loaded_at[key] = clock
                    scalars[BYTES] += expert_bytes
                    acc_out[i, 0] = 0
                    acc_out[i, 1] = slot
                    acc_out[i, 2] = evicted
                if flag & PREFILL:
                    scalars[PREFILL_HITS if hit else PREFILL_MISSES] += 1
                else:
                    scalars[HITS if hit else MISSES] += 1
                    if flag & FIRST:
                        scalars[FIRST_HITS if hit else FIRST_MISSES] += 1
                last_use[key] = clock
                use_count[key] += 1
                if rank == RANK_BELADY:
                    nxt[key] = following[i]
                scalars[CLOCK] = clock
                i += 1
            if scalars[PENDING]:  # this layer's prefetches are consumed: the driver waited for what it used
                for x in range(layer * num_experts, (layer + 1) * num_experts):
                    if pending[x]:
                        pending[x] = False
                        scalars[PENDING] -= 1
            cursor[2], cursor[1] = 1, -1
            if python_prefetch:
                return NEED_PREFETCH
        r = cursor[1]
        if r < 0:  # requests never evict an expert requested in the same call (nor the event's own)
            r = req_off[e]
            if affinity_k > 0 and not flag & PREFILL and layer + 1 < counts.shape[0]:
                _affinity_requests(counts, layer, experts, lo, hi, affinity_k, num_experts, scratch, req_key, r)
            for q in range(req_off[e], req_off[e + 1]):
                stamp[req_key[q]] = serial
        while r < req_off[e + 1]:
            key = req_key[r]
            target = key // num_experts
            req_out[r, 0] = -1
            req_out[r, 1] = -1
            if target == layer or slot_of[key] >= 0:
                r += 1
                continue  # this layer is already served, or the expert is resident
            pool = layer_pool[target]
            evicted = -1
            if pools[pool, 2] < pools[pool, 1]:
                slot = pools[pool, 2]
                pools[pool, 2] += 1
            else:
                if victim >= 0:
                    evicted = victim
                    victim = -1
                else:
                    n = _candidates(pools, key_in, pool, pending, stamp, serial, False, ordered, cand)
                    if n == 0:
                        r += 1
                        continue  # every slot of that pool holds an in-flight prefetch or a protected expert
                    if rank == RANK_PYTHON:
                        cursor[1], cursor[4] = r, n
                        return NEED_VICTIM
                    evicted = _ranked(rank, cand, n, ints, table, nxt, rng, age, awaiting, span, num_experts)
                slot = _evict(evicted, ints, flags, key_in, pools, layer_pool, scalars, num_experts)
            slot_of[key] = slot
            key_in[pools[pool, 0] + slot] = key
            loaded_at[key] = scalars[CLOCK]
            scalars[BYTES] += expert_bytes
            pending[key] = True
            scalars[PENDING] += 1
            unused[key] = True
            scalars[PF_ISSUED] += 1
            req_out[r, 0] = slot
            req_out[r, 1] = evicted
            r += 1
        cursor[0], cursor[3] = e + 1, 0
    return DONE


@numba.njit(cache=True, error_model="numpy")
def next_accesses(ev, acc_off, experts, group_start, num_experts, out):  # pragma: no cover - compiled
    """Belady's future: per access the index of the next access of the same key within its group of events
    (groups: events group_start[g]..group_start[g + 1] - 1), NEVER if none; one backward pass."""
    num_keys = 1
    for e in range(ev.shape[0]):
        num_keys = max(num_keys, (ev[e, 0] + 1) * num_experts)
    seen = np.full(num_keys, -1, dtype=np.int64)  # the group in which each key's `after` was written
    after = np.empty(num_keys, dtype=np.int64)
    for g in range(len(group_start) - 1):
        for e in range(group_start[g + 1] - 1, group_start[g] - 1, -1):
            base = ev[e, 0] * num_experts
            for i in range(acc_off[e + 1] - 1, acc_off[e] - 1, -1):
                key = base + experts[i]
                out[i] = after[key] if seen[key] == g else NEVER
                seen[key] = g
                after[key] = i


@numba.njit(cache=True, error_model="numpy")
def first_accesses(ev, acc_off, experts, first, end, num_experts, out):  # pragma: no cover - compiled
    """Per key (out, flat [L * E]) the index of its first access among events first..end-1, NEVER if none."""
    out[:] = NEVER
    for e in range(end - 1, first - 1, -1):
        base = ev[e, 0] * num_experts
        for i in range(acc_off[e + 1] - 1, acc_off[e] - 1, -1):
            out[base + experts[i]] = i


@numba.njit(cache=True, error_model="numpy")
def timeline(ev, acc_off, experts, req_off, req_key, acc_out, req_out, e_from, e_to, num_experts, copy_s,
             expert_s, layer_s, ready, out):  # pragma: no cover - compiled  # fmt: skip
    """moe_env.sim.Replayer's time model over events e_from..e_to-1 of one sequence (the link idle and every copy
    landed as it starts): per routed layer its compute, then demand loads, then prefetches, FIFO on one link;
    each expert computed once its copy has landed. out = (decode stall, prefill stall, decode time)."""
    now = 0.0
    link_free = 0.0
    e = e_from
    while e < e_to:
        end = e + 1
        while end < e_to and not ev[end, 2] & NEW_ROUTING:
            end += 1
        start = now
        t = start + layer_s
        stall = 0.0
        for g in range(e, end):
            layer, bypass = ev[g, 0], ev[g, 2] & BYPASS
            link = link_free
            if not bypass:
                for i in range(acc_off[g], acc_off[g + 1]):
                    if not acc_out[i, 0] & 1:
                        link = max(link, t) + copy_s
                        ready[layer, experts[i]] = link
            for r in range(req_off[g], req_off[g + 1]):
                if req_out[r, 0] >= 0:
                    link = max(link, t) + copy_s
                    ready[req_key[r] // num_experts, req_key[r] % num_experts] = link
            if bypass:  # streamed for this layer only, not installed: ready when copied
                for i in range(acc_off[g], acc_off[g + 1]):
                    if not acc_out[i, 0] & 1:
                        link = max(link, t) + copy_s
                        ready[layer, experts[i]] = link
            link_free = link
            for i in range(acc_off[g], acc_off[g + 1]):
                landed = ready[layer, experts[i]]
                if landed > t:
                    stall += landed - t
                    t = landed
                t += expert_s
        now = t
        if ev[e, 1] >= 0:
            out[0] += stall
            out[2] += t - start
        else:
            out[1] += stall
        e = end
