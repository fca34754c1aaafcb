"""Inter-layer affinity prefetch: P(expert j at layer l+1 | experts at layer l), learned online from routing.

After layer l routes experts S for a decode token, prefetch the k experts of layer l+1 with the highest mean
conditional probability over S. The co-activation counts persist across sequences (they are learned knowledge,
not cache state) and start from a uniform prior, so the first tokens prefetch arbitrarily.
Related: inter-layer expert affinity in "Exploiting Inter-Layer Expert Affinity for Accelerating MoE Inference"
(Yao et al., IPDPS 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_env.policy import CacheView, ModelSpec, Policy, RouteEvent


class AffinityPrefetch(Policy):
    prefetch_only = True
    replay_prefetch = "affinity"  # a replay runs observe and prefetch in moe_env.cache_kernel on count_table, exactly
    name = "affinity"

    def __init__(self, k: int | None = None, prior: float = 0.1):
        self.k = k  # experts to prefetch per layer; default: the model's top-k
        self.prior = float(prior)
        self._counts: np.ndarray | None = None

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        super().reset(spec, capacity)
        shape = (spec.num_layers, spec.num_experts, spec.num_experts)
        if self._counts is None or self._counts.shape != shape:
            self._counts = np.full(shape, self.prior, dtype=np.float64)
        self._previous: tuple[int, int, tuple[int, ...]] | None = None  # (step, layer, experts)

    @property
    def count_table(self) -> np.ndarray:
        """[L, E, E] the co-activation counts (a kernel replay updates them in place of observe)."""
        return self._counts

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        if event.prefill:
            return
        prev = self._previous
        if prev is not None and prev[0] == event.step and prev[1] == event.layer - 1:
            counts = self._counts[prev[1]]
            for row in prev[2]:  # k x k distinct cells: plain loops cost less than np.ix_ for a handful
                line = counts[row]
                for column in event.experts:
                    line[column] += 1.0
        self._previous = (event.step, event.layer, event.experts)

    def conditional(self, layer: int) -> np.ndarray:
        """[E, E] estimate of P(expert j at layer+1 | expert i at layer)."""
        counts = self._counts[layer]
        return counts / counts.sum(axis=1, keepdims=True)

    def prefetch(self, event: RouteEvent, cache: CacheView) -> Sequence[tuple[int, int]]:
        if event.prefill or event.layer + 1 >= self.spec.num_layers:
            return ()
        k = min(self.k or self.spec.top_k, cache.capacity)
        rows = self._counts[event.layer][list(event.experts)]  # conditional() of the event's rows only
        scores = (rows / rows.sum(axis=1, keepdims=True)).mean(axis=0)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(event.layer + 1, int(e)) for e in top]
