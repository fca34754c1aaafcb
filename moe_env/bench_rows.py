"""One row schema for ``moe-env bench --json``: slot sweeps (``--cache-slots``), budget sweeps (``--cache-budget``)
and the reports that reuse bench's rows (agents/evaluate.py, the training scripts' summaries) all print it.

Keys, in order (docs/policies.md, "Measuring them"): what ran (trace, policy, prefetch), the cache it ran on
(allocation as given, layout as built, slots per layer when every layer has the same, total_slots, bytes, warm,
prefill), then the metrics of moe_env.sim.SimResult under their own names. A metric a sweep does not compute is
None (gap_captured in budget sweeps), never left out, so every row has every key.
"""

from __future__ import annotations

from moe_env.sim import SimResult


def bench_row(
    trace: str,
    policy: str,
    prefetch: str,
    result: SimResult,
    *,
    allocation: str,
    slots: int | None,
    expert_bytes: int,
    gap_captured: float | None = None,
) -> dict:
    """The JSON row of one replay. `slots`: slots per layer (None when layers differ: shared or profile)."""
    r = result
    return {
        "trace": trace,
        "policy": policy,
        "prefetch": prefetch,
        "allocation": allocation,
        "layout": r.allocation,
        "slots": slots,
        "total_slots": r.total_slots,
        "bytes": r.total_slots * expert_bytes,
        "warm": r.warm,
        "prefill": r.prefill,
        "hits": r.hits,
        "misses": r.misses,
        "hit_rate": r.hit_rate,
        "first_hit_rate": r.first_hit_rate,
        "gap_captured": gap_captured,
        "prefetch_precision": r.prefetch_precision,
        "prefetch_recall": r.prefetch_recall,
        "bytes_moved": r.bytes_moved,
        "stall_s_per_token": r.stall_s_per_token,
        "tokens_per_s": r.tokens_per_s,
    }
