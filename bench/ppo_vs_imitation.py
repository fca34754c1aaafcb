"""What PPO adds to its starting policy: each seed's best PPO checkpoint against the imitation policy it started from.

For every capacity and every evaluation set (validation, held-out), the imitation policy's hit rate, gap captured
((hit - LRU) / (Belady - LRU)) and stall per token, then each PPO run's change against it (PPO - imitation), and the
mean and spread (sample standard deviation) of the change over the runs. Both sides replay the same prompts through
the same simulator and cost model in this one run.

    .venv/bin/python bench/ppo_vs_imitation.py --runs runs/ppo-s0 runs/ppo-s1 runs/ppo-s2 \\
        --validation '../shared/traces/dsv2lite-puffin#id=801-900' \\
        --held-out '../shared/traces/dsv2lite-puffin#id=901-1000' --capacities 8,16,32 \\
        --profile consumer-pcie4:deepseek-v2-lite
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_env.agents.imitation import ImitationPolicy, shipped_imitation_path
from moe_env.agents.ppo import PPOPolicy
from moe_env.agents.traces import load_traces

from moe_env.sim import simulate

METRICS = ("hit_rate", "gap_captured", "stall_ms_per_token")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="PPO run directories (their best-policy.pt) or .pt files")
    p.add_argument("--start", default=None, help="the imitation checkpoint they started from (default: shipped)")
    p.add_argument("--validation", required=True, help="validation traces spec")
    p.add_argument("--held-out", required=True, help="held-out traces spec")
    p.add_argument("--capacities", default="16", help="slots per layer, comma-separated")
    p.add_argument("--profile", default=None, help="cost model HARDWARE[:EXPERTS]")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def measure(trace, policy, capacity: int, profile: str | None, references: dict) -> dict:
    result = simulate(trace, policy, capacity, profile)
    lru, belady = references[capacity]
    gap = (result.hit_rate - lru) / (belady - lru) if belady > lru else float("nan")
    return {"hit_rate": result.hit_rate, "gap_captured": gap, "stall_ms_per_token": 1e3 * result.stall_s_per_token}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    capacities = [int(c) for c in args.capacities.split(",")]
    start = Path(args.start) if args.start else shipped_imitation_path()
    policies = [Path(r) / "best-policy.pt" if Path(r).is_dir() else Path(r) for r in args.runs]
    rows = []
    for label, spec in (("validation", args.validation), ("held-out", args.held_out)):
        trace = load_traces(spec)
        references = {c: tuple(simulate(trace, name, c).hit_rate for name in ("lru", "belady")) for c in capacities}
        for capacity in capacities:
            base = measure(trace, ImitationPolicy(start), capacity, args.profile, references)
            changes = {m: [] for m in METRICS}
            per_run = []
            for path in policies:
                got = measure(trace, PPOPolicy(path), capacity, args.profile, references)
                per_run.append(got)
                for m in METRICS:
                    changes[m].append(got[m] - base[m])
            row = {
                "set": label,
                "capacity": capacity,
                "imitation": base,
                "ppo": per_run,
                "change_mean": {m: statistics.mean(v) for m, v in changes.items()},
                "change_sd": {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in changes.items()},
            }
            rows.append(row)
            print_row(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def print_row(row: dict) -> None:
    base, mean, sd = row["imitation"], row["change_mean"], row["change_sd"]
    seeds = "  ".join(
        f"{r['hit_rate'] - base['hit_rate']:+.4f}/{r['gap_captured'] - base['gap_captured']:+.3f}" for r in row["ppo"]
    )
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
