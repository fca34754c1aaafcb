"""`moe-env analyze`: statistics and figures about a trace, written as report.md + PNGs (moe_env.analysis)."""

from __future__ import annotations

import argparse

from moe_env.analysis import default_options, write_report
from moe_env.trace import load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="trace spec: a trace file, a .jsonl routing log or builtin:MODEL[/SPLIT]")
    parser.add_argument("--out", required=True, help="directory for report.md and its figures")
    parser.add_argument("--cache-slots", type=int, default=None, help="LRU slots per layer (default: half the experts)")
    parser.add_argument(
        "--layer-pair", type=int, default=None, help="affinity heatmap of layer L -> L+1 (default: mid)"
    )


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    options = default_options(trace, args.cache_slots, args.layer_pair)
    files = write_report(trace, args.out, options, title=args.trace)
    print(f"wrote {len(files)} files to {args.out}: {', '.join(files)}")
    return 0
