"""First in, first out: evict the resident expert that was loaded longest ago (reuse does not matter)."""

from __future__ import annotations

import numpy as np

from moe_env.policy import CacheView, Policy


class FIFOPolicy(Policy):
    independent_sequences = True  # nothing it decides by survives reset()
    name = "fifo"
    ranks_across_layers = True  # load time on the cache clock
    replay_kernel = "fifo"  # ranked inside moe_env.cache_kernel (no Python call per eviction)

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        return cache.loaded_at(layer)[candidates].astype(np.float64)
