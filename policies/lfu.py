"""Least frequently used: evict the expert with the fewest uses this sequence (uses while evicted count too).

Ties go to the least recently used (the cache's tie-break), matching the reference semantics of the shared
Mixtral traces.
"""

from __future__ import annotations

import numpy as np

from moe_env.policy import CacheView, Policy


class LFUPolicy(Policy):
    independent_sequences = True  # nothing it decides by survives reset()
    name = "lfu"
    ranks_across_layers = True  # use counts: every layer is accessed top-k times per token
    replay_kernel = "lfu"  # ranked inside moe_env.cache_kernel (no Python call per eviction)

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        return cache.use_count(layer)[candidates].astype(np.float64)
