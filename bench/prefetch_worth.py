"""Prefetchers side by side: the rows of ``moe-env bench`` for every (eviction, prefetch, slots), streamed as they
are computed, without bench's memory-at-equal-hit-rate search (which replays extra budgets), then one table.

    python bench/prefetch_worth.py --trace T --policies lru,lrfu:lam=0.01 --prefetch none,affinity,predictor \\
        --cache-slots 8,16,32 --profile consumer-pcie4:deepseek-v2-lite

Every figure comes from the same replays as ``moe-env bench`` with the same options (moe_env.commands.bench
``Bench``): hit rate (prefetched copies count, so compare stall), stall per token, prefetches used and wasted,
and the copy link's idle time per token (decode time minus copies x copy time: on one FIFO link, the most that
prefetching can hide without cutting the number of copies; a used prefetch replaces a demand copy, it does not
remove one). ``--prefetch`` takes plug-in specs with options separated by ``;`` instead of ``,`` (e.g.
``predictor:horizon=1;max_in_flight=none``).
"""

from __future__ import annotations

import argparse
import sys

from moe_env.commands.bench import Bench
from moe_env.errors import MoeEnvError
from moe_env.trace import load_trace


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True)
    p.add_argument("--policies", default="lru")
    p.add_argument("--prefetch", default="none,affinity,predictor")
    p.add_argument("--cache-slots", default="8,16,32")
    p.add_argument("--profile", default=None)
    return p.parse_args(argv)


def link_idle_s_per_token(result, cost) -> float:
    """Decode time the copy link spends idle, per token: decode time minus the decode copies' link time."""
    if not result.decode_tokens:
        return 0.0
    copies = result.misses + result.prefetch_issued
    return (result.decode_time_s - copies * cost.copy_s) / result.decode_tokens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        slots = [int(s) for s in args.cache_slots.split(",")]
        policies = args.policies.split(",")
        prefetchers = [spec.replace(";", ",") for spec in args.prefetch.split(",")]
        bench = Bench(args.trace, load_trace(args.trace), args.profile)
        print(f"trace {args.trace}, profile {bench.cost.name}", flush=True)
        cells = {}
        for s in slots:
            for policy in policies:
                for prefetch in prefetchers:
                    r = bench.row(policy, prefetch, s).result
                    cells[policy, prefetch, s] = r
                    print(f"{policy:16s} {prefetch:10s} {s:3d} slots: hit rate {r.hit_rate:.3f}, stall "
                          f"{1e3 * r.stall_s_per_token:.2f} ms/token, prefetch used {r.prefetch_used} wasted "
                          f"{r.prefetch_wasted}, link idle {1e3 * link_idle_s_per_token(r, bench.cost):.2f} ms/token",
                          flush=True)  # fmt: skip
    except MoeEnvError as exc:
        print(f"prefetch_worth.py: error: {exc}", file=sys.stderr)
        return 2
    print("\nstall ms/token (hit rate, prefetches used / wasted; link idle ms/token)")
    print(f"\n| eviction | prefetch | {' | '.join(f'{s} slots' for s in slots)} |")
    print("|---|---|" + "---|" * len(slots))
    for policy in policies:
        for prefetch in prefetchers:
            row = []
            for s in slots:
                r = cells[policy, prefetch, s]
                used = ""
                if prefetch != "none":
                    used = f", {r.prefetch_used / 1e3:.1f} k used / {r.prefetch_wasted / 1e3:.1f} k wasted"
                idle = f"; idle {1e3 * link_idle_s_per_token(r, bench.cost):.2f}"
                row.append(f"{1e3 * r.stall_s_per_token:.2f} ({r.hit_rate:.3f}{used}{idle})")
            print(f"| {policy} | {prefetch} | {' | '.join(row)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
