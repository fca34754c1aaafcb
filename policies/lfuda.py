"""LFU with dynamic aging (LFUDA): key = cache age L + uses since the expert was loaded; evicting sets L.

M. Arlitt, L. Cherkasova, J. Dilley, R. Friedrich, T. Jin, "Evaluating Content Management Techniques for Web
Proxy Caches", ACM SIGMETRICS Performance Evaluation Review 27(4), 2000. Counts restart when an expert is
evicted (unlike ``lfu``, which counts uses since the sequence began); L = the key of the last victim, so
experts that were popular long ago age out. A prefetched expert not yet used has key L.

The state is arrays (``aging_state``) so that moe_env.cache_kernel can apply these rules itself
(``replay_kernel = "lfuda"``); tests/test_sim_kernels.py checks it against this Python code decision by decision.
"""

from __future__ import annotations

import numpy as np

from moe_env.policy import CacheView, ModelSpec, Policy, RouteEvent


class LFUDAPolicy(Policy):
    independent_sequences = True  # nothing it decides by survives reset()
    name = "lfuda"
    replay_kernel = "lfuda"  # moe_env.cache_kernel runs observe and the aging on aging_state, exactly

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        super().reset(spec, capacity)
        layers, experts = spec.num_layers, spec.num_experts
        self._key = np.zeros((layers, experts), dtype=np.float64)
        self._uses = np.zeros((layers, experts), dtype=np.float64)  # since loaded
        self._age = np.zeros(layers, dtype=np.float64)
        # per layer, the experts of its last event that load in place of a victim, in access order: each takes
        # its key from the age its eviction sets (a queue: _awaiting[layer, head:end], span = (head, end))
        self._awaiting = np.zeros((layers, experts), dtype=np.int64)
        self._span = np.zeros((layers, 2), dtype=np.int64)

    @property
    def aging_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(key [L, E], uses since loaded [L, E], age [L], awaiting [L, E], span [L, 2]): what the kernel updates."""
        return self._key, self._uses, self._age, self._awaiting, self._span

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        layer = event.layer
        last_use, loaded_at = cache.last_use(layer), cache.loaded_at(layer)
        uses, key, age = self._uses[layer], self._key[layer], self._age[layer]
        free = cache.layer_capacity(layer) - len(cache.resident(layer))
        span = self._span[layer]
        span[:] = 0
        for expert in event.experts:
            if cache.is_resident(layer, expert):
                # used since it was loaded: one more use; a prefetched expert's first use: one
                uses[expert] = uses[expert] + 1 if last_use[expert] >= loaded_at[expert] else 1
                key[expert] = age + uses[expert]
                continue
            uses[expert] = 1
            if free > 0:  # loads into a free slot: the age stays
                free -= 1
                key[expert] = age + 1
            else:  # loads in place of a victim: its key needs the age that eviction sets
                self._awaiting[layer, span[1]] = expert
                span[1] += 1

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        unused_prefetch = cache.last_use(layer)[candidates] < cache.loaded_at(layer)[candidates]
        scores = np.where(unused_prefetch, self._age[layer], self._key[layer][candidates])
        self._age[layer] = scores.min()  # the cache evicts the lowest score: its key is the new age
        span = self._span[layer]
        if span[0] < span[1]:
            self._key[layer, self._awaiting[layer, span[0]]] = self._age[layer] + 1
            span[0] += 1
        return scores
