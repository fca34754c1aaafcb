"""Belady's MIN: evict the expert whose next use is farthest in the future (the offline optimum of demand caching).

Replay only (reads cache.next_use). With one expert loaded per miss and no prefetch, MIN is optimal per layer
for the number of misses; experts never used again score -inf and go first (ties: least recently used).
"""

from __future__ import annotations

import numpy as np

from moe_env.policy import CacheView, Policy


class BeladyPolicy(Policy):
    independent_sequences = True  # nothing it decides by survives reset()
    name = "belady"
    ranks_across_layers = True  # accesses until the next use, on the one cache clock
    replay_kernel = "belady"  # ranked inside moe_env.cache_kernel (no Python call per eviction)
    needs_future = True

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        return -np.array([cache.next_use(layer, int(e)) for e in candidates], dtype=np.float64)
