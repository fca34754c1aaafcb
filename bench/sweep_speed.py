"""Wall time of one `moe-env bench` sweep, serial against `--workers N` (a local Ray), in one run; same rows.

    nice -n 10 .venv/bin/python bench/sweep_speed.py [--trace SPEC] [--select 0-99] [--workers 2]

Default: the DeepSeek-V2-Lite dev set (../shared/traces/dsv2lite-puffin), every heuristic eviction policy x
budgets 8,16,32 of 64 experts x prefetch none/affinity. ``--select`` keeps a prefix (any ``SPEC#...`` selection)
when the whole set is too slow to replay twice. Each mode runs the real command in a fresh process (Ray startup
included in the parallel time); the script checks that both printed the same JSON rows and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "dsv2lite-puffin"
HEURISTICS = "fifo,random:seed=0,lru,lfu,lfu-decay:decay=0.9,lrfu:lam=0.01,lfuda,belady"


def run_bench(argv: list[str]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moe_env.cli", "bench", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"sweep_speed: moe-env bench failed: {done.stderr.strip()}")
    return wall, json.loads(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--select", default="", help="sequence selection appended as SPEC#SELECT, e.g. 0-99")
    p.add_argument("--policies", default=HEURISTICS)
    p.add_argument("--prefetch", default="none,affinity")
    p.add_argument("--cache-slots", default="8,16,32")
    p.add_argument("--profile", default=None)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    spec = f"{args.trace}#{args.select}" if args.select else args.trace
    argv = ["--trace", spec, "--policies", args.policies, "--prefetch", args.prefetch, "--cache-slots",
            args.cache_slots, "--json"] + (["--profile", args.profile] if args.profile else [])  # fmt: skip
    serial, serial_rows = run_bench(argv)
    parallel, parallel_rows = run_bench([*argv, "--workers", str(args.workers)])
    same = serial_rows == parallel_rows
    print(f"moe-env bench {' '.join(argv)}")
    print(f"{len(serial_rows)} rows; identical in both modes: {'yes' if same else 'NO'}")
    print(f"{'mode':<14}{'wall s':>10}{'vs serial':>11}")
    print(f"{'serial':<14}{serial:>10.1f}{1.0:>11.2f}")
    print(f"{f'--workers {args.workers}':<14}{parallel:>10.1f}{serial / parallel:>11.2f}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
