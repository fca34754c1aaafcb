"""Simulator throughput in expert accesses per second, per built-in policy, against a plain reference loop.

The reference is the least a simulator must do: a minimal pure-Python per-layer LRU over the same decode
accesses (no timing, no counters beyond hits). Medians over --repeat runs of CPU time, one core, side by side.
Policies are built once per row (the plug-in registry lookup, ~2 ms per spec, is printed apart). Two paths, same
decisions: ``kernel`` (the default replay: a sequence at a time through the cache kernel, built-in rankings and
prefetchers inside it, Python only for a plug-in's own victims; the set-scorer eviction plug-ins, imitation,
imitation-shared and ppo, in agents/scored_replay.py's compiled loop around the kernel) and ``route``
(``fast=False``: one ExpertCacheState.route call per event, what the env and the engine do; also the default for
plug-ins with Python observe/prefetch hooks, printed as kernel=route). numba compiles the kernel on first use: the
compile time (from scratch, in a subprocess with an empty NUMBA_CACHE_DIR) and this process's first call (the cached
machine code loaded) are printed apart and never counted in a rate (each rate: the median of --repeat runs after that).

    nice -n 10 .venv/bin/python bench/sim_speed.py [--trace SPEC] [--slots 4] [--repeat 5] [--learned-trace SPEC]
                                                   [--learned-only]

Every built-in eviction policy with every prefetcher (none, lookahead, affinity, oracle) on --trace (default: the
shared Mixtral log, which has no lookahead logits: lookahead prefetches nothing there), then the shipped learned
policies on --learned-trace (flat-predictor needs tiny-mixtral's shape), each table with its own reference loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe_env.policy import build_policy
from moe_env.sim import Replayer, compiled_router, cost_model_for, simulate
from moe_env.trace import Trace, load_trace

DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mixtral-8x7b-gsm8k-routing.jsonl"
HEURISTICS = ["lru", "lfu", "fifo", "belady", "random:seed=0", "lfu-decay:decay=0.9", "lrfu:lam=0.1", "lfuda"]
PREFETCHERS = [None, "lookahead", "affinity", "oracle"]
# timed on --learned-trace (flat-predictor runs on tiny-mixtral only)
LEARNED = ["flat-predictor", "imitation", "imitation-shared", "ppo"]
RUNS = [(policy, prefetch) for prefetch in PREFETCHERS for policy in HEURISTICS]


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
    """Accesses per CPU-second of this process (time.process_time): on a shared machine wall time measures the
    neighbours; CPU time is what one idle core would give."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return accesses / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", default="consumer-pcie4")
    parser.add_argument("--learned-trace", default="builtin:tiny-mixtral/eval", help="trace for the learned rows")
    parser.add_argument("--learned-only", action="store_true", help="only the learned policies' table")
    args = parser.parse_args()
    if not args.learned_only:
        jit_compile_time()
        table(load_trace(args.trace), args.trace, args.slots, args.repeat, args.profile, RUNS)
        print()
    table(load_trace(args.learned_trace), args.learned_trace, args.slots, args.repeat, args.profile,
          [(p, None) for p in LEARNED])  # fmt: skip


def table(trace: Trace, label: str, slots: int, repeat: int, profile: str, runs: list) -> None:
    """One run: the reference loop and each (policy, prefetch) through the fast and the general path."""
    accesses = trace.num_accesses
    cost = cost_model_for(trace.meta, profile)
    first = _time(lambda: simulate(trace, build_policy("lru"), slots, cost))  # JIT load (or compile): not a rate
    if all(s.prefill_experts is None or not len(s.prefill_experts) for s in trace.sequences):
        assert reference_lru(trace, slots) == simulate(trace, "lru", slots, profile).hits  # (it skips prefill)
    reference = median_rate(lambda: reference_lru(trace, slots), accesses, repeat)
    print(f"trace {label}: {accesses} decode accesses, {slots} slots, median of {repeat}")
    print(f"{'policy':<22}{'prefetch':<11}{'path':<9}{'accesses/s':>12}{'vs reference':>14}")
    print(f"{'reference LRU loop':<42}{reference:>12,.0f}{1.0:>14.3f}")
    lookup = statistics.median(_time(lambda: build_policy("lru")) for _ in range(repeat))
    print(f"(plug-in registry lookup per policy spec: {1e3 * lookup:.1f} ms, not included below)")
    print(f"(first kernel call in this process, JIT load included: {first:.2f} s, not included below)")
    for policy, prefetch in runs:
        for fast in (True, False):
            built = build_policy(policy, prefetch)
            in_kernel = Replayer(trace.meta, built, slots, cost).cache.routes_in_kernel
            in_kernel = in_kernel or compiled_router(built) is not None  # the set-scorer plug-ins' compiled replay
            if fast and not in_kernel:
                print(f"{policy:<22}{prefetch or 'none':<11}{'kernel':<9}{'= route':>12}{'(hooks)':>14}")
                continue
            rate = median_rate(lambda b=built, q=fast: simulate(trace, b, slots, cost, fast=q), accesses, repeat)
            path = "kernel" if fast else "route"
            print(f"{policy:<22}{prefetch or 'none':<11}{path:<9}{rate:>12,.0f}{rate / reference:>14.3f}", flush=True)


JIT_PROBE = """
import time
from moe_env.sim import simulate
from moe_env.trace import load_trace
trace = load_trace("builtin:tiny-mixtral/eval")
start, cpu = time.perf_counter(), time.process_time()
simulate(trace, "lru", 4)  # one compiled kernel for every policy; the timing pass alike
print(time.perf_counter() - start, time.process_time() - cpu)
"""


def jit_compile_time() -> None:
    """The cache kernel's first call in a fresh process: with an empty numba cache (compiled from scratch, what a
    clean checkout pays once) and with the cache that run left (loaded)."""
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"NUMBA_CACHE_DIR": cache}
        for label in ("compile from scratch", "load from cache"):
            out = subprocess.run([sys.executable, "-c", JIT_PROBE], env=env, check=True, capture_output=True, text=True)
            wall, cpu = (float(x) for x in out.stdout.split())
            print(f"cache kernel's first call in a fresh process, {label}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    print()


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
