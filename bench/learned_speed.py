"""Replay speed of the learned eviction plug-ins: compiled replay against one route call per event, in one run.

    nice -n 10 .venv/bin/python bench/learned_speed.py --trace builtin:tiny-olmoe/eval --slots 8 --repeats 3
    nice -n 10 .venv/bin/python bench/learned_speed.py --trace EVAL.npz --slots 16 --repeats 3 --per-event-repeats 1

Per policy two paths, same decisions (checked here: the tallies must be equal): ``compiled`` (the default replay:
agents/scored_replay.py feeds the features and ranks victims around the cache kernel, no Python per event) and
``per-event`` (``fast=False``: ExpertCacheState.route per event with the plug-in's Python observe and
eviction_scores, what the engine and the env do). Heuristics through both of their paths and the reference loop of
bench/sim_speed.py (a bare per-layer LRU) give the scale. Medians of CPU seconds (one core, what an idle machine
gives) and wall seconds (what this machine gave, neighbours included); the first call of each policy (numba's
cached code loaded, the checkpoint read) is not counted. EVAL: DeepSeek-V2-Lite prompts 901-1000 saved once with
moe_env.trace.save_trace (``load_trace('../shared/traces/dsv2lite-puffin#id=901-1000')``).
"""

from __future__ import annotations

import argparse
import statistics
import time

from sim_speed import reference_lru

from moe_env.policy import build_policy
from moe_env.sim import SimTally, cost_model_for, replay
from moe_env.trace import Trace, load_trace


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median CPU s, median wall s, last result) over `repeats` calls."""
    cpu, wall, result = [], [], None
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        result = fn()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return statistics.median(cpu), statistics.median(wall), result


def run(trace: Trace, spec: str, slots: int, fast: bool, profile: str | None) -> SimTally:
    return replay(trace, build_policy(spec), slots, cost_model_for(trace.meta, profile), fast=fast)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", default="builtin:tiny-olmoe/eval")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per-event-repeats", type=int, default=None, help="repeats of the per-event path (slow)")
    p.add_argument("--policies", default="imitation,imitation-shared,ppo")
    p.add_argument("--heuristics", default="lfu-decay,lru")
    p.add_argument("--profile", default=None)
    args = p.parse_args()
    trace = load_trace(args.trace)
    accesses = trace.num_accesses
    slow_repeats = args.per_event_repeats or args.repeats
    print(f"trace {args.trace}: {len(trace.sequences)} sequences, {accesses:,} decode accesses, {args.slots} slots; "
          f"medians of {args.repeats} (per-event: {slow_repeats})")  # fmt: skip
    reference_cpu, reference_wall, _ = timed(lambda: reference_lru(trace, args.slots), args.repeats)
    print(f"{'policy':<18}{'path':<11}{'CPU s':>9}{'wall s':>9}{'acc/CPU s':>12}{'acc/wall s':>12}"
          f"{'vs per-event':>14}{'vs reference':>14}")  # fmt: skip
    print(f"{'reference LRU':<29}{reference_cpu:>9.2f}{reference_wall:>9.2f}{accesses / reference_cpu:>12,.0f}"
          f"{accesses / reference_wall:>12,.0f}{'':>14}{1.0:>14.3f}")  # fmt: skip
    for spec in [s for s in args.policies.split(",") if s] + [s for s in args.heuristics.split(",") if s]:
        run(trace, spec, args.slots, True, args.profile)  # the first call: JIT code and checkpoint loaded
        fast_cpu, fast_wall, fast = timed(lambda s=spec: run(trace, s, args.slots, True, args.profile), args.repeats)
        slow_cpu, slow_wall, slow = timed(lambda s=spec: run(trace, s, args.slots, False, args.profile), slow_repeats)
        if fast != slow:
            raise SystemExit(f"{spec}: the compiled and the per-event replay disagree: {fast} != {slow}")
        for path, cpu, wall in (("compiled", fast_cpu, fast_wall), ("per-event", slow_cpu, slow_wall)):
            print(f"{spec:<18}{path:<11}{cpu:>9.2f}{wall:>9.2f}{accesses / cpu:>12,.0f}{accesses / wall:>12,.0f}"
                  f"{slow_cpu / cpu:>14.1f}{reference_cpu / cpu:>14.3f}", flush=True)  # fmt: skip
        print(f"{'':<18}hit rate {fast.counters.hit_rate:.4f}, identical tallies on both paths")


if __name__ == "__main__":
    main()
