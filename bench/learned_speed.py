"""Replay speed of the imitation policy against heuristics, all through the general path, in one run.

    python bench/learned_speed.py --trace builtin:tiny-olmoe/eval --slots 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from moe_env.policy import build_policy
from moe_env.sim import simulate
from moe_env.trace import load_trace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", default="builtin:tiny-olmoe/eval")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--policies", default="imitation,lfu-decay,lru")
    args = p.parse_args()
    trace = load_trace(args.trace)
    accesses = trace.num_accesses
    for spec in args.policies.split(","):
        times = []
        for _ in range(args.repeats):
            policy = build_policy(spec)
            start = time.process_time()
            simulate(trace, policy, args.slots, fast=False)  # every policy through ExpertCacheState.route
            times.append(time.process_time() - start)
        print(f"{spec:12s} {accesses / statistics.median(times):>10.0f} accesses/s (median of {args.repeats})")


if __name__ == "__main__":
    main()
