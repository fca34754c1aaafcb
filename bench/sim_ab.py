"""Simulator throughput of two checkouts side by side, interleaved in one run (before/after a change).

    python bench/sim_ab.py --base ../main/.venv/bin/python --head .venv/bin/python [--rounds 2] [--trace SPEC]

Each checkout's Python (an editable install of that tree) replays the same trace through the same policies in a
fresh process, alternating base and head for --rounds rounds, on two paths: ``route`` (``fast=False``: one
ExpertCacheState.route call per event, the env's and the engine's path) and ``default`` (what ``simulate`` does
unless told otherwise); accesses per CPU-second, the median over every repeat of every round, and head / base.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path

DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mixtral-8x7b-gsm8k-routing.jsonl"
RUNS = "lru,lfu-decay:decay=0.9,lru+lookahead,lru+affinity,belady+oracle"
PROBE = """
import sys, time
from moe_env.policy import build_policy
from moe_env.sim import cost_model_for, simulate
from moe_env.trace import load_trace
trace = load_trace(sys.argv[1])
cost = cost_model_for(trace.meta, "consumer-pcie4")
simulate(trace, "lru", 4, cost)  # compiled code loaded before any timing
for run in sys.argv[3].split(","):
    policy, _, prefetch = run.partition("+")
    built = build_policy(policy, prefetch or None)
    for path, fast in (("route", False), ("default", True)):
        for _ in range(int(sys.argv[2])):
            start = time.process_time()
            simulate(trace, built, 4, cost, fast=fast)
            print(f"{run} ({path})", trace.num_accesses / (time.process_time() - start))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="python of the checkout before the change")
    parser.add_argument("--head", required=True, help="python of the checkout after the change")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--runs", default=RUNS, help="comma-separated POLICY[+PREFETCH]")
    args = parser.parse_args()
    rates: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for side, python in (("base", args.base), ("head", args.head)):
            command = [python, "-c", PROBE, args.trace, str(args.repeat), args.runs]
            for line in subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines():
                run, rate = line.rsplit(" ", 1)
                rates.setdefault(run, {}).setdefault(side, []).append(float(rate))
    print("| run | base accesses/s | head accesses/s | head / base |\n|---|---|---|---|")
    for run, sides in rates.items():
        base, head = statistics.median(sides["base"]), statistics.median(sides["head"])
        print(f"| {run} | {base:,.0f} | {head:,.0f} | {head / base:.2f}x |")


if __name__ == "__main__":
    main()
