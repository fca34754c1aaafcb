"""Least recently used: evict the resident expert whose last access is oldest."""

from __future__ import annotations

import numpy as np

from moe_env.policy import CacheView, Policy


class LRUPolicy(Policy):
    independent_sequences = True  # nothing it decides by survives reset()
    name = "lru"
    ranks_across_layers = True  # last use on the cache clock, one clock for all layers
    replay_kernel = "lru"  # ranked inside moe_env.cache_kernel (no Python call per eviction)

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        return cache.last_use(layer)[candidates].astype(np.float64)
