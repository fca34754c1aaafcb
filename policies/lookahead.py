"""Speculative gate lookahead prefetch: load the top-k experts of the next layer's gate applied to this layer's input.

The lookahead logits arrive with each RouteEvent (the engine computes them; traces store them). Without them
(converted logs, the last layer) nothing is prefetched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_env.policy import CacheView, Policy, RouteEvent


class LookaheadPrefetch(Policy):
    independent_sequences = True  # nothing it decides by survives reset()
    prefetch_only = True
    replay_prefetch = "lookahead"  # a replay reads these requests off the trace (moe_env.sim_kernels), exactly
    name = "lookahead"

    def __init__(self, k: int | None = None):
        self.k = k  # experts to prefetch per layer; default: the model's top-k

    def prefetch(self, event: RouteEvent, cache: CacheView) -> Sequence[tuple[int, int]]:
        logits = event.lookahead_logits
        if logits is None or event.prefill or event.layer + 1 >= self.spec.num_layers:
            return ()
        k = min(self.k or self.spec.top_k, cache.capacity)
        top = np.argsort(-np.asarray(logits, dtype=np.float64), kind="stable")[:k]
        return [(event.layer + 1, int(e)) for e in top]
