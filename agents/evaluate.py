"""Learned policies vs the heuristics on eval traces: rows with the same metric names as ``moe-env bench``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

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
    combos = [(spec, "none") for spec in learned] + list(heuristics_for(trace))
    return bench, [bench.row(policy, prefetch, capacity) for policy, prefetch in combos]


def heuristics_for(trace: Trace) -> tuple[tuple[str, str], ...]:
    """HEURISTICS without the lookahead prefetch rows when the trace has no lookahead logits (imported logs):
    those rows would only repeat their demand-only twins."""
    has_lookahead = any(s.lookahead_logits is not None for s in trace.sequences)
    return tuple(combo for combo in HEURISTICS if has_lookahead or combo[1] != "lookahead")


def report(bench: Bench, rows: list[Row], as_json: bool) -> None:
    if as_json:
        print(json_text([row.as_dict() for row in rows]))
    else:
        print_table(rows, [bench])


def best_heuristic(rows: list[Row]) -> Row:
    """The heuristic (non-oracle) with the lowest stall per token."""
    fair = [r for r in rows if (r.policy, r.prefetch) in HEURISTICS and r.policy != "belady"]
    return min(fair, key=lambda r: r.result.stall_s_per_token)


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float (undefined metric) replaced by None, recursively: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_text(value: Any) -> str:
    """Strict JSON (allow_nan=False) of `value`, undefined metrics as null."""
    return json.dumps(json_safe(value), indent=1, allow_nan=False, default=str)


def write_text_atomically(path: Path, text: str) -> None:
    """A results file written to a temp name and renamed: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
