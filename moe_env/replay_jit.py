"""The compiled loops of moe_env.sim_kernels (numba, ``cache=True``: compiled once per machine, then loaded).

Imported only when a fast replay runs: importing numba costs about a second, which commands that never replay
should not pay. The semantics (what each rank means) are documented in moe_env.sim_kernels.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def replay(kind, keys, offsets, seg_start, seg_capacity, num_keys, hits):  # pragma: no cover - compiled
    """Hit flags of every access into `hits` (uint8); returns the number of evictions."""
    resident = np.zeros(num_keys, dtype=np.bool_)
    primary = np.zeros(num_keys, dtype=np.int64)  # lru: last use, fifo: load time, lfu: uses, belady: -next use
    last = np.zeros(num_keys, dtype=np.int64)  # last use (the tie-break)
    stamp = np.full(num_keys, -1, dtype=np.int64)  # the last event that accessed the key (protected while current)
    following = np.zeros(len(keys), dtype=np.int64)  # belady: index of the next access of the same key
    seen = np.zeros(num_keys, dtype=np.int64)
    slots = np.zeros(max(1, seg_capacity.max()) if len(seg_capacity) else 1, dtype=np.int64)
    evictions = 0
    for segment in range(len(seg_capacity)):
        first_event, end_event = seg_start[segment], seg_start[segment + 1]
        if first_event == end_event:
            continue
        lo, hi = offsets[first_event], offsets[end_event]
        capacity = seg_capacity[segment]
        for i in range(lo, hi):
            resident[keys[i]] = False
            primary[keys[i]] = 0
            stamp[keys[i]] = -1
        if kind == 3:
            never = hi + 1
            for i in range(lo, hi):
                seen[keys[i]] = never
            for i in range(hi - 1, lo - 1, -1):
                following[i] = seen[keys[i]]
                seen[keys[i]] = i
        count = 0
        for event in range(first_event, end_event):
            for i in range(offsets[event], offsets[event + 1]):
                stamp[keys[i]] = event  # the event's own experts are never candidates
            for i in range(offsets[event], offsets[event + 1]):
                key = keys[i]
                if resident[key]:
                    hits[i] = 1
                else:
                    hits[i] = 0
                    if count < capacity:
                        slot = count
                        count += 1
                    else:
                        slot = -1
                        for s in range(count):
                            other = slots[s]
                            if stamp[other] == event:
                                continue  # needed by this event
                            if (
                                slot < 0
                                or primary[other] < primary[slots[slot]]
                                or (primary[other] == primary[slots[slot]] and last[other] < last[slots[slot]])
                            ):
                                slot = s
                        resident[slots[slot]] = False
                        evictions += 1
                    slots[slot] = key
                    resident[key] = True
                    if kind == 1:
                        primary[key] = i
                if kind == 0:
                    primary[key] = i
                elif kind == 2:
                    primary[key] += 1
                elif kind == 3:
                    primary[key] = -following[i]
                last[key] = i
    return evictions


@numba.njit(cache=True)
def event_times(offsets, hits, copy_s, expert_s, event_hits, stall, duration):  # pragma: no cover - compiled
    """Per event its hits, stall and duration with the link idle as it starts: the Replayer's timing, demand-only."""
    for event in range(len(offsets) - 1):
        t = 0.0
        waited = 0.0
        loads = 0
        for i in range(offsets[event], offsets[event + 1]):
            if hits[i]:
                event_hits[event] += 1
            else:
                loads += 1
                landed = loads * copy_s
                if landed > t:
                    waited += landed - t
                    t = landed
            t += expert_s
        stall[event] = waited
        duration[event] = t
