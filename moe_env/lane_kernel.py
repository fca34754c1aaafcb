"""One decision step of many replay-env lanes in one compiled call (numba, ``cache=True``): moe_env.lane_env.

Per lane: the action becomes the target layer's scores (clipped to [-1, 1], as ``ActionPolicy.set_scores``), the
lane's current decode event is routed by moe_env.cache_kernel.advance over the lane's own cache arrays (the
demand misses ranked by the layer's scores, or LRU while the layer has none: ``ActionPolicy``'s fallback; then the
prefetch requests ``ActionPolicy.prefetch`` makes, ranked by the target layer's scores), and the cost model's time
line advances (``moe_env.sim.Replayer.process`` for one decode event: demand loads then prefetches FIFO on one
link, each expert computed once its copy has landed). The cache's rules stay those of cache_kernel; this loop only
feeds it the lanes' events and the action's scores.

numba's on-disk cache is keyed by this file alone: the machine code it keeps embeds cache_kernel.advance as it was
compiled, so after changing cache_kernel.py delete ``moe_env/__pycache__/lane_kernel.*`` (or touch this file); a
fresh checkout compiles afresh (about 4 CPU s, once).
"""

from __future__ import annotations

import numba
import numpy as np

from moe_env.cache_kernel import NEED_PREFETCH, RANK_LRU, RANK_SCORES, advance, no_aging


@numba.njit(cache=True, error_model="numpy")
def _prefetch_requests(scores, target, capacity, slot_of, num_experts, req_key):  # pragma: no cover - compiled
    """ActionPolicy.prefetch: of the `capacity` best scores (stable descending order) those > 0 whose expert is
    not resident, as keys in that order; returns how many."""
    order = np.argsort(-scores, kind="mergesort")
    n = 0
    for j in range(min(capacity, num_experts)):
        x = order[j]
        if scores[x] > 0.0 and slot_of[target, x] < 0:
            req_key[n] = target * num_experts + x
            n += 1
    return n


@numba.njit(cache=True, error_model="numpy")
def step_lanes(lanes, actions, ints, flags, key_in, pools, layer_pool, scalars, stamp, cursor, cand, scores,
               has_scores, clock, ready, hits, misses, stall_sum, position, ev_layer, ev_step, ev_flags,
               ev_experts, capacity, expert_bytes, copy_s, expert_s, layer_s, stall_out, scratch, no_index,
               no_counts, no_rng):  # pragma: no cover - compiled  # fmt: skip
    """Step lanes[j] with actions[j] (float64 [len(lanes), E]); state arrays have a leading lane axis; events
    (ev_*, experts [events, k]) are indexed by position[lane], which advances by one. stall_out[j]: the modeled
    stall of the routed layer in seconds."""
    num_layers, num_experts = scores.shape[1], scores.shape[2]
    k = ev_experts.shape[1]
    aging = no_aging()
    ev1 = np.zeros((1, 3), dtype=np.int64)
    acc_off1 = np.zeros(2, dtype=np.int64)
    acc_off1[1] = k
    experts1 = np.zeros(k, dtype=np.int64)
    acc_out1 = np.zeros((k, 3), dtype=np.int64)
    req_off1 = np.zeros(2, dtype=np.int64)
    req_key1 = np.zeros(num_experts, dtype=np.int64)
    req_out1 = np.zeros((num_experts, 2), dtype=np.int64)
    for j in range(lanes.shape[0]):
        n = lanes[j]
        e = position[n]
        layer = ev_layer[e]
        target = (layer + 1) % num_layers
        for x in range(num_experts):
            scores[n, target, x] = min(max(actions[j, x], -1.0), 1.0)
        has_scores[n, target] = True
        ev1[0, 0], ev1[0, 1], ev1[0, 2] = layer, ev_step[e], ev_flags[e]
        for i in range(k):
            experts1[i] = ev_experts[e, i]
        req_off1[1] = 0
        lane_ints, lane_flags, lane_keys, lane_pools = ints[n], flags[n], key_in[n], pools[n]
        lane_scalars, lane_stamp, lane_cand, lane_scores = scalars[n], stamp[n], cand[n], scores[n]
        lane_cursor = cursor[n]
        lane_cursor[:] = 0
        rank = RANK_SCORES if has_scores[n, layer] else RANK_LRU
        status = advance(lane_ints, lane_flags, lane_keys, lane_pools, layer_pool, lane_scalars, lane_stamp, ev1,
                         acc_off1, experts1, req_off1, req_key1, acc_out1, req_out1, lane_cursor, lane_cand, -1, 1,
                         rank, 1.0, lane_scores, aging, no_index, no_index, num_experts, expert_bytes, True,
                         no_counts, 0, scratch, no_rng)  # fmt: skip
        assert status == NEED_PREFETCH
        requests = _prefetch_requests(scores[n, target], target, capacity, ints[n, 0], num_experts, req_key1)
        req_off1[1] = requests
        advance(lane_ints, lane_flags, lane_keys, lane_pools, layer_pool, lane_scalars, lane_stamp, ev1, acc_off1,
                experts1, req_off1, req_key1, acc_out1, req_out1, lane_cursor, lane_cand, -1, 1, RANK_SCORES, 1.0,
                lane_scores, aging, no_index, no_index, num_experts, expert_bytes, True, no_counts, 0, scratch,
                no_rng)  # fmt: skip
        # the time line (Replayer.process): demand loads, then the prefetches, FIFO on one link
        start = clock[n, 0]
        t = start + layer_s
        link = clock[n, 1]
        for i in range(k):
            if not acc_out1[i, 0] & 1:
                link = max(link, t) + copy_s
                ready[n, layer, experts1[i]] = link
        for r in range(requests):
            if req_out1[r, 0] >= 0:
                link = max(link, t) + copy_s
                key = req_key1[r]
                ready[n, key // num_experts, key % num_experts] = link
        clock[n, 1] = link
        stall = 0.0
        for i in range(k):
            if acc_out1[i, 0] & 1:
                hits[n] += 1
            else:
                misses[n] += 1
            landed = ready[n, layer, experts1[i]]
            if landed > t:
                stall += landed - t
                t = landed
            t += expert_s
        clock[n, 0] = t
        stall_sum[n] += stall
        stall_out[j] = stall
        position[n] = e + 1
