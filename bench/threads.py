"""Decode speed against the torch thread count, on a quiet machine and next to busy processes: the measurement
behind moe_env.threads.DEFAULT_THREADS (docs/performance.md, "Threads").

    .venv/bin/python bench/threads.py                      # tiny-mixtral, threads 1,2,default, 0 and 2 busy
    .venv/bin/python bench/threads.py --threads 1,2,4 --busy 0,2,4 --repeats 7 --json

One process, one engine. For each load level the script starts that many busy processes itself (pure-Python spin
loops at this process's priority), then decodes the same prompt `repeats` times per thread count, the thread
counts interleaved (rotated each round) so that drift in the background load hits each of them alike. Reports
the median tok/s (min-max) and the ratio to torch's default thread count under the same load; "default" is what
torch chose at start-up (one thread per physical core), before anything set it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from moe_env.engine import EngineConfig, OffloadEngine

SPIN = "while True: pass"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-mixtral")
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cache-slots", default="4")
    p.add_argument("--policy", default="lru")
    p.add_argument("--prefetch", default="lookahead")
    p.add_argument("--threads", default="1,2,default", help="thread counts; 'default' is torch's own choice")
    p.add_argument("--busy", default="0,2", help="numbers of busy processes to run beside the decode")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 2:
        p.error("--repeats must be >= 1 and --new-tokens >= 2")
    return args


def thread_counts(text: str, default: int) -> list[tuple[str, int]]:
    """'1,2,default' -> [('1', 1), ('2', 2), ('default', torch's)], one entry per distinct count."""
    counts: dict[int, str] = {}
    for piece in (p.strip() for p in text.split(",") if p.strip()):
        value = default if piece == "default" else int(piece)
        if value < 1:
            raise SystemExit(f"threads must be >= 1, got {piece}")
        label = "default" if piece == "default" else piece
        counts[value] = f"{counts[value]} = {label}" if value in counts else label
    return [(label, value) for value, label in counts.items()]


def start_busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]


def stop_busy(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


def measure(args: argparse.Namespace) -> list[dict]:
    default = torch.get_num_threads()
    counts = thread_counts(args.threads, default)
    engine = OffloadEngine(
        EngineConfig(model=args.model, cache_slots=args.cache_slots, policy=args.policy, prefetch=args.prefetch)
    )
    rows = []
    with engine:
        torch.set_num_threads(1)
        engine.generate(args.prompt, 4)  # warm-up: first-call allocations, page cache
        for busy in (int(b) for b in args.busy.split(",")):
            processes = start_busy(busy)
            try:
                time.sleep(1.0 if busy else 0.0)  # let the spinners get scheduled
                load_before = os.getloadavg()[0]
                speeds: dict[int, list[float]] = {value: [] for _, value in counts}
                for round_ in range(args.repeats):
                    order = counts[round_ % len(counts) :] + counts[: round_ % len(counts)]
                    for _, value in order:
                        torch.set_num_threads(value)
                        speeds[value].append(engine.generate(args.prompt, args.new_tokens).metrics.tokens_per_s)
                load_after = os.getloadavg()[0]
            finally:
                stop_busy(processes)
            reference = statistics.median(speeds[default]) if default in speeds else float("nan")
            for label, value in counts:
                median = statistics.median(speeds[value])
                rows.append({
                    "busy_processes": busy, "threads": value, "label": label, "median_tok_s": round(median, 1),
                    "min_tok_s": round(min(speeds[value]), 1), "max_tok_s": round(max(speeds[value]), 1),
                    "vs_default": round(median / reference, 2), "load_avg_1min": [load_before, load_after],
                    "torch_default": default,
                })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = measure(args)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(
        f"{args.model}, {args.cache_slots} slots, {args.policy} + {args.prefetch}, {args.new_tokens} tokens, "
        f"median of {args.repeats}; {os.cpu_count()} CPUs, torch's default {rows[0]['torch_default']} threads"
    )
    print("| busy processes | threads | tok/s median (min-max) | vs default | load avg (1 min, before/after) |")
    print("|---|---|---|---|---|")
    for r in rows:
        load = "/".join(f"{x:.1f}" for x in r["load_avg_1min"])
        print(
            f"| {r['busy_processes']} | {r['label']} | {r['median_tok_s']} ({r['min_tok_s']}-{r['max_tok_s']}) "
            f"| {r['vs_default']:.2f}x | {load} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
