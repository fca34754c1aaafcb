"""Frequency with exponential aging: LFU that forgets (``lfu-decay:decay=0.9``), and LRFU, its published form.

Each access of a layer multiplies every expert's score in that layer by ``decay`` and adds 1 to the accessed
expert, so the score of expert e is sum over its past accesses of decay**(accesses of the layer since then).
decay=1 is LFU, decay -> 0 approaches LRU; ties go to the least recently used (the cache's tie-break).

LRFU (D. Lee et al., "LRFU: A Spectrum of Policies that Subsumes the Least Recently Used and Least Frequently
Used Policies", IEEE Trans. Computers 50(12), 2001) weighs each past reference by F(x) = (1/2)**(lam * x):
the same family with decay = 2**-lam, and the layer's access count as its clock. ``lrfu:lam=0.1``.
"""

from __future__ import annotations

import numpy as np

from moe_env.errors import UsageError
from moe_env.policy import CacheView, ModelSpec, Policy, RouteEvent


class LFUDecayPolicy(Policy):
    independent_sequences = True  # nothing it decides by survives reset()
    name = "lfu-decay"
    ranks_across_layers = True  # per-layer decay, but every layer is accessed top-k times per token
    replay_kernel = "lfu-decay"  # moe_env.cache_kernel applies observe to score_table and ranks by it, exactly

    def __init__(self, decay: float = 0.9):
        decay = float(decay)
        if not 0.0 < decay <= 1.0:
            raise UsageError(f"lfu-decay: decay must be in (0, 1], got {decay}")
        self.decay = decay

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        super().reset(spec, capacity)
        self._score = np.zeros((spec.num_layers, spec.num_experts), dtype=np.float64)

    @property
    def score_table(self) -> np.ndarray:
        """[L, E] the scores eviction_scores reads (the cache's kernel updates it in place of observe)."""
        return self._score

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        row = self._score[event.layer]
        for expert in event.experts:  # per access, as the cache's clock counts them
            row *= self.decay
            row[expert] += 1.0

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        return self._score[layer][candidates]


class LRFUPolicy(LFUDecayPolicy):
    name = "lrfu"
    replay_kernel = "lfu-decay"  # declared per class (never inherited): the same scores with decay = 2**-lam

    def __init__(self, lam: float = 0.1):
        lam = float(lam)
        if not 0.0 <= lam <= 1.0:
            raise UsageError(f"lrfu: lam must be in [0, 1], got {lam}")
        super().__init__(decay=0.5**lam)
        self.lam = lam
