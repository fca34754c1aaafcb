"""What PPO adds to its starting policy: each PPO checkpoint against the imitation policy it started from.

For every capacity and every evaluation set (validation, held-out), the imitation policy's hit rate, gap captured
((hit - LRU) / (Belady - LRU)) and stall per token, then each PPO run's change against it (PPO - imitation), and the
mean and spread (sample standard deviation) of the change over the runs. Both sides replay the same prompts through
the same simulator and cost model in this one run.

Work saved without changing any decision: a checkpoint whose scorer weights equal the start's (a run whose best is
its step 0) or another checkpoint's decides exactly as that one, so it is replayed once and its result reused (the
row says "= start" / "= run N"); the replays (one per set, capacity and distinct scorer) run in ``--jobs``
processes. A capacity's replays are independent (the policies' online statistics are per capacity), so this too
leaves every decision as in one process; give more than one job only where cores are free.

    .venv/bin/python bench/ppo_vs_imitation.py --runs runs/ppo-s0 runs/ppo-s1 runs/ppo-s2 \\
        --validation '../shared/traces/dsv2lite-puffin#id=801-900' \\
        --held-out '../shared/traces/dsv2lite-puffin#id=901-1000' --capacities 8,16,32 \\
        --profile consumer-pcie4:deepseek-v2-lite --json runs/ppo-vs-imitation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from moe_env.agents.checkpoint import load_checkpoint
from moe_env.agents.imitation import ImitationPolicy, load_scorer_net, shipped_imitation_path
from moe_env.agents.ppo import KIND, PPOPolicy
from moe_env.agents.traces import load_traces

from moe_env.error_boundary import run_reporting_errors
from moe_env.errors import UsageError
from moe_env.sim import simulate

METRICS = ("hit_rate", "gap_captured", "stall_ms_per_token")
START = "start"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="PPO run directories (their best-policy.pt) or .pt files")
    p.add_argument("--start", default=None, help="the imitation checkpoint they started from (default: shipped)")
    p.add_argument("--validation", required=True, help="validation traces spec")
    p.add_argument("--held-out", default=None, help="held-out traces spec (default: validation only)")
    p.add_argument("--capacities", default="16", help="slots per layer, comma-separated")
    p.add_argument("--profile", default=None, help="cost model HARDWARE[:EXPERTS]")
    p.add_argument("--jobs", type=int, default=1, help="replay processes (default 1; more only where cores are free)")
    p.add_argument("--json", default=None, help="also write the rows here (rewritten after each finished row)")
    return p.parse_args(argv)


def scorer_weights(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """The scorer's weights as the plug-in loads them (so both sides are read the same way)."""
    return load_scorer_net(load_checkpoint(path, kind), str(path)).state_dict()


def distinct_policies(start: Path, runs: list[Path]) -> list[str | int]:
    """For each run: START if its scorer weights equal the start's, the index of an earlier run with equal weights,
    or its own index (replayed). Equal weights and the same feature tables mean the same decision everywhere."""
    seen: list[tuple[str | int, dict[str, torch.Tensor]]] = [(START, scorer_weights(start, "imitation"))]
    same: list[str | int] = []
    for i, path in enumerate(runs):
        weights = scorer_weights(path, KIND)
        match = next((label for label, other in seen if _equal(weights, other)), None)
        if match is None:
            seen.append((i, weights))
            match = i
        same.append(match)
    return same


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@lru_cache(maxsize=2)
def _trace(spec: str):
    return load_traces(spec)  # once per process and set: a replay worker serves many tasks of one set


def replay(spec: str, policy: tuple[str, str], capacity: int, profile: str | None) -> dict:
    """One task: (hit rate, gap captured, stall) of `policy` (("imitation" | "ppo", checkpoint path)) on `spec`."""
    trace = _trace(spec)
    lru, belady = (simulate(trace, name, capacity).hit_rate for name in ("lru", "belady"))
    kind, path = policy
    plugin = ImitationPolicy(path) if kind == "imitation" else PPOPolicy(path)
    result = simulate(trace, plugin, capacity, profile)
    gap = (result.hit_rate - lru) / (belady - lru) if belady > lru else float("nan")
    return {"hit_rate": result.hit_rate, "gap_captured": gap, "stall_ms_per_token": 1e3 * result.stall_s_per_token}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reporting_errors("ppo_vs_imitation.py", lambda: compare(args))


def compare(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    capacities = [int(c) for c in args.capacities.split(",")]
    start = Path(args.start) if args.start else shipped_imitation_path()
    runs = [Path(r) / "best-policy.pt" if Path(r).is_dir() else Path(r) for r in args.runs]
    same = distinct_policies(start, runs)
    for i, label in enumerate(same):
        if label != i:
            print(f"run {i} ({runs[i]}) has the weights of {'the start' if label == START else f'run {label}'}: "
                  "replayed once, result reused", flush=True)  # fmt: skip
    replayed = {i: (KIND, str(runs[i])) for i, label in enumerate(same) if label == i}
    policies = {START: ("imitation", str(start))} | replayed
    sets = [("validation", args.validation)] + ([("held-out", args.held_out)] if args.held_out else [])
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) if args.jobs > 1 else InProcess() as pool:
        # capacity first: a run stopped early has both sets at the first capacities
        futures = {(label, c, key): pool.submit(replay, spec, policy, c, args.profile)
                   for c in capacities for label, spec in sets for key, policy in policies.items()}  # fmt: skip
        for capacity in capacities:
            for label, _ in sets:
                got = {key: futures[(label, capacity, key)].result() for key in policies}
                rows.append(compare_row(label, capacity, got[START], [got[key] for key in same], same))
                print_row(rows[-1])
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


class InProcess:
    """The executor of ``--jobs 1``: a task runs here when its result is asked for, so rows stream in order."""

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> Deferred:
        return Deferred(lambda: fn(*args))


class Deferred:
    def __init__(self, compute):
        self.compute = compute

    def result(self):
        return self.compute()


def compare_row(label: str, capacity: int, base: dict, per_run: list[dict], same: list[str | int]) -> dict:
    changes = {m: [run[m] - base[m] for run in per_run] for m in METRICS}
    return {
        "set": label,
        "capacity": capacity,
        "imitation": base,
        "ppo": per_run,
        "same_as": same,
        "change": changes,
        "change_mean": {m: statistics.mean(v) for m, v in changes.items()},
        "change_sd": {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in changes.items()},
    }


def print_row(row: dict) -> None:
    base, mean, sd = row["imitation"], row["change_mean"], row["change_sd"]
    seeds = "  ".join(f"{h:+.4f}/{g:+.3f}" for h, g in zip(row["change"]["hit_rate"], row["change"]["gap_captured"],
                                                            strict=True))  # fmt: skip
    print(
        f"{row['set']:<10} {row['capacity']:>3} slots  imitation hit {base['hit_rate']:.4f} "
        f"gap {base['gap_captured']:.3f} stall {base['stall_ms_per_token']:.2f} ms/tok | "
        f"PPO-imitation hit {mean['hit_rate']:+.4f}±{sd['hit_rate']:.4f} "
        f"gap {mean['gap_captured']:+.3f}±{sd['gap_captured']:.3f} stall {mean['stall_ms_per_token']:+.3f}"
        f"±{sd['stall_ms_per_token']:.3f} ms/tok | per run hit/gap {seeds}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
