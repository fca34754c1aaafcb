"""Random eviction (seeded, ``random:seed=0``): the floor any policy should beat."""

from __future__ import annotations

import numpy as np

from moe_env.policy import CacheView, Policy


class RandomPolicy(Policy):
    name = "random"
    ranks_across_layers = True  # random draws
    replay_kernel = "random"  # moe_env.cache_kernel draws from `generator` exactly as eviction_scores does

    @property
    def generator(self) -> np.random.Generator:
        """The policy's one stream (the cache kernel draws the candidates' scores from it)."""
        return self._rng

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)  # one stream per policy object: a run is reproducible

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        return self._rng.random(len(candidates))
