"""LFU with dynamic aging (LFUDA): key = cache age L + uses since the expert was loaded; evicting sets L.

M. Arlitt, L. Cherkasova, J. Dilley, R. Friedrich, T. Jin, "Evaluating Content Management Techniques for Web
Proxy Caches", ACM SIGMETRICS Performance Evaluation Review 27(4), 2000. Counts restart when an expert is
evicted (unlike ``lfu``, which counts uses since the sequence began); L = the key of the last victim, so
experts that were popular long ago age out. A prefetched expert not yet used has key L.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from moe_env.policy import CacheView, ModelSpec, Policy, RouteEvent


class LFUDAPolicy(Policy):
    independent_sequences = True  # nothing it decides by survives reset()
    name = "lfuda"

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        super().reset(spec, capacity)
        self._age = np.zeros(spec.num_layers, dtype=np.float64)
        self._uses = np.zeros((spec.num_layers, spec.num_experts), dtype=np.float64)  # since loaded
        self._key = np.zeros((spec.num_layers, spec.num_experts), dtype=np.float64)
        self._awaiting: list[deque[int]] = [deque() for _ in range(spec.num_layers)]

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        layer = event.layer
        last_use, loaded_at = cache.last_use(layer), cache.loaded_at(layer)
        uses, key = self._uses[layer], self._key[layer]
        free = cache.layer_capacity(layer) - len(cache.resident(layer))
        awaiting = self._awaiting[layer]
        awaiting.clear()
        for expert in event.experts:
            if cache.is_resident(layer, expert):
                # used since it was loaded: one more use; a prefetched expert's first use: one
                uses[expert] = uses[expert] + 1 if last_use[expert] >= loaded_at[expert] else 1
                key[expert] = self._age[layer] + uses[expert]
                continue
            uses[expert] = 1
            if free > 0:  # loads into a free slot: the age stays
                free -= 1
                key[expert] = self._age[layer] + 1
            else:  # loads in place of a victim: its key needs the age that eviction sets
                awaiting.append(expert)

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        unused_prefetch = cache.last_use(layer)[candidates] < cache.loaded_at(layer)[candidates]
        scores = np.where(unused_prefetch, self._age[layer], self._key[layer][candidates])
        self._age[layer] = scores.min()  # the cache evicts the lowest score: its key is the new age
        if self._awaiting[layer]:
            self._key[layer][self._awaiting[layer].popleft()] = self._age[layer] + 1
        return scores
