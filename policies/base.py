"""Shared pieces of the built-in policies."""

from __future__ import annotations

from moe_env.policy import Policy


class NoPrefetch(Policy):
    """`--prefetch none`: never prefetch (the demand-only baseline)."""

    independent_sequences = True  # nothing it decides by survives reset()
    prefetch_only = True
    name = "none"
