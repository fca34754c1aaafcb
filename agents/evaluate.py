"""Learned policies vs the heuristics on eval traces: rows with the same metric names as ``moe-env bench``."""

from __future__ import annotations

import json
import math

from moe_env.commands.bench import Bench, Row, print_table
from moe_env.trace import Trace

# (policy, prefetch): fifo, lru, lfu-decay, lookahead prefetch (over LRU), and the Belady oracle
HEURISTICS: tuple[tuple[str, str], ...] = (
    ("fifo", "none"),
    ("lru", "none"),
    ("lfu", "none"),
    ("lfu-decay", "none"),
    ("lru", "lookahead"),
    ("lfu-decay", "lookahead"),
    ("belady", "none"),
)


def compare(
    label: str, trace: Trace, learned: list[str], capacity: int, profile: str | None
) -> tuple[Bench, list[Row]]:
    """Rows for every heuristic and every learned policy spec (``ppo:PATH``...) at `capacity` slots."""
    bench = Bench(label, trace, profile)
    combos = [(spec, "none") for spec in learned] + list(HEURISTICS)
    return bench, [bench.row(policy, prefetch, capacity) for policy, prefetch in combos]


def report(bench: Bench, rows: list[Row], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_clean(row.as_dict()) for row in rows], indent=1))
    else:
        print_table(rows, [bench])


def best_heuristic(rows: list[Row]) -> Row:
    """The heuristic (non-oracle) with the lowest stall per token."""
    fair = [r for r in rows if (r.policy, r.prefetch) in HEURISTICS and r.policy != "belady"]
    return min(fair, key=lambda r: r.result.stall_s_per_token)


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
