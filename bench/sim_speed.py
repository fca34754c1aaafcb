"""Simulator throughput in expert accesses per second, per built-in policy, against a plain reference loop.

The reference is the least a simulator must do: a minimal pure-Python per-layer LRU over the same decode
accesses (no timing, no counters beyond hits). Medians over --repeat runs, one core, printed side by side.
Policies are built once per row (the plug-in registry lookup, ~2 ms per spec, is printed apart).

    nice -n 10 .venv/bin/python bench/sim_speed.py [--trace SPEC] [--slots 4] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from moe_env.policy import build_policy
from moe_env.sim import cost_model_for, simulate
from moe_env.trace import Trace, load_trace

DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mixtral-8x7b-gsm8k-routing.jsonl"
RUNS = [
    ("lru", None),
    ("lfu", None),
    ("fifo", None),
    ("belady", None),
    ("random:seed=0", None),
    ("lfu-decay:decay=0.9", None),
    ("lrfu:lam=0.1", None),
    ("lfuda", None),
    ("lru", "lookahead"),
    ("lru", "affinity"),
    ("lru", "oracle"),
]


def reference_lru(trace: Trace, slots: int) -> int:
    hits = 0
    for seq in trace.sequences:
        for layer in range(trace.meta.num_layers):
            rows = seq.experts[:, layer]
            recency: list[int] = []
            for row in rows[rows[:, 0] >= 0].tolist():
                for expert in row:
                    if expert in recency:
                        recency.remove(expert)
                        hits += 1
                    elif len(recency) >= slots:
                        for victim in recency:
                            if victim not in row:
                                recency.remove(victim)
                                break
                    recency.append(expert)
    return hits


def median_rate(fn, accesses: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return accesses / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", default="consumer-pcie4")
    args = parser.parse_args()
    trace = load_trace(args.trace)
    accesses = trace.num_accesses
    assert reference_lru(trace, args.slots) == simulate(trace, "lru", args.slots, args.profile).hits
    reference = median_rate(lambda: reference_lru(trace, args.slots), accesses, args.repeat)
    print(f"trace {args.trace}: {accesses} decode accesses, {args.slots} slots, median of {args.repeat}")
    print(f"{'policy':<22}{'prefetch':<11}{'path':<9}{'accesses/s':>12}{'vs reference':>14}")
    print(f"{'reference LRU loop':<42}{reference:>12,.0f}{1.0:>14.2f}")
    lookup = statistics.median(_time(lambda: build_policy("lru")) for _ in range(args.repeat))
    print(f"(plug-in registry lookup per policy spec: {1e3 * lookup:.1f} ms, not included below)")
    cost = cost_model_for(trace.meta, args.profile)
    for policy, prefetch in RUNS:
        for fast in (True, False):
            if fast and (prefetch or policy not in ("lru", "lfu", "fifo", "belady")):
                continue
            built = build_policy(policy, prefetch)
            rate = median_rate(
                lambda b=built, q=fast: simulate(trace, b, args.slots, cost, fast=q), accesses, args.repeat
            )
            path = "fast" if fast else "general"
            print(f"{policy:<22}{prefetch or 'none':<11}{path:<9}{rate:>12,.0f}{rate / reference:>14.2f}")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
