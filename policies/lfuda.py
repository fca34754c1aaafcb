"""LFU with dynamic aging (LFUDA): key = cache age L + uses since the expert was loaded; evicting sets L.

M. Arlitt, L. Cherkasova, J. Dilley, R. Friedrich, T. Jin, "Evaluating Content Management Techniques for Web
Proxy Caches", ACM SIGMETRICS Performance Evaluation Review 27(4), 2000. Counts restart when an expert is
evicted (unlike ``lfu``, which counts uses since the sequence began); L = the key of the last victim, so
experts that were popular long ago age out. A prefetched expert not yet used has key L.
"""

from __future__ import annotations

import numpy as np

from moe_env.policy import CacheView, ModelSpec, Policy, RouteEvent


class LFUDAPolicy(Policy):
    name = "lfuda"

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        super().reset(spec, capacity)
        self._age = np.zeros(spec.num_layers, dtype=np.float64)
        self._uses = np.zeros((spec.num_layers, spec.num_experts), dtype=np.float64)  # since loaded
        self._key = np.zeros((spec.num_layers, spec.num_experts), dtype=np.float64)

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        layer = event.layer
        last_use, loaded_at = cache.last_use(layer), cache.loaded_at(layer)
        uses, key = self._uses[layer], self._key[layer]
        for expert in event.experts:
            # resident and used since it was loaded: one more use; else this is its first use since loading
            if cache.is_resident(layer, expert) and last_use[expert] >= loaded_at[expert]:
                uses[expert] += 1
            else:
                uses[expert] = 1
            key[expert] = self._age[layer] + uses[expert]

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        unused_prefetch = cache.last_use(layer)[candidates] < cache.loaded_at(layer)[candidates]
        scores = np.where(unused_prefetch, self._age[layer], self._key[layer][candidates])
        self._age[layer] = scores.min()  # the cache evicts the lowest score: its key is the new age
        return scores
