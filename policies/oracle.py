"""Oracle prefetch: load exactly the experts the next layer will route to (replay only: an upper bound).

After layer l of token t, prefetch the experts of (t, l+1), or of (t+1, 0) after the last layer: what a perfect
one-layer-ahead predictor would fetch. Nothing is prefetched during prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

from moe_env.policy import CacheView, Policy, RouteEvent


class OraclePrefetch(Policy):
    independent_sequences = True  # nothing it decides by survives reset()
    prefetch_only = True
    replay_prefetch = "oracle"  # a replay reads these requests off the trace (moe_env.sim_kernels), exactly
    needs_future = True
    name = "oracle"

    def prefetch(self, event: RouteEvent, cache: CacheView) -> Sequence[tuple[int, int]]:
        if event.prefill:
            return ()
        step, layer = event.step, event.layer + 1
        if layer >= self.spec.num_layers:
            step, layer = step + 1, 0
        experts = cache.future_experts(step, layer)
        return [(layer, e) for e in experts] if experts else ()
