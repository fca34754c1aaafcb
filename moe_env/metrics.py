"""Run metrics of the live engine, under the names used everywhere (sim, bench, env)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_env.cache import Counters


@dataclass
class RunMetrics:
    hits: int = 0
    misses: int = 0
    hit_rate: float = 0.0
    prefill_hits: int = 0
    prefill_misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0  # time compute waited for copies
    copy_s: float = 0.0  # time the link spent copying
    ttft_s: float = 0.0  # prefill + first token
    decode_s: float = 0.0  # the decode forwards after the first token
    tokens_per_s: float = 0.0  # decode tokens / decode_s
    new_tokens: int = 0
    peak_cache_bytes: int = 0
    first_hit_rate: float = 0.0  # decode hit rate of the first FIRST_TOKENS steps (how the prefill left the cache)
    bypass_loads: int = 0  # prefill experts computed from copies that were not installed (prefill bypass)

    @classmethod
    def from_counters(cls, counters: Counters, **timing: float) -> RunMetrics:
        fields = {k: v for k, v in counters.as_dict().items() if k in cls.__dataclass_fields__}
        return cls(**fields, **timing)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
