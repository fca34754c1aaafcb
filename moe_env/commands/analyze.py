"""`moe-env analyze`: statistics and figures about a trace, written as report.md + PNGs (moe_env.analysis)."""

from __future__ import annotations

import argparse

from moe_env.analysis import default_options, write_report
from moe_env.errors import UsageError
from moe_env.outputs import check_writable_dir
from moe_env.trace import load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="trace spec: a trace file, a .jsonl routing log or builtin:MODEL[/SPLIT]")
    parser.add_argument("--out", required=True, help="directory for report.md and its figures")
    parser.add_argument("--cache-slots", type=int, default=None, help="LRU slots per layer (default: half the experts)")
    parser.add_argument(
        "--layer-pair", type=int, default=None, help="affinity heatmap of layer L -> L+1 (default: mid)"
    )


def run(args: argparse.Namespace) -> int:
    out = check_writable_dir(args.out, "--out")
    trace = load_trace(args.trace)
    options = default_options(trace, args.cache_slots, args.layer_pair)
    meta = trace.meta
    if not meta.top_k <= options.capacity <= meta.num_experts:
        raise UsageError(f"--cache-slots {options.capacity} outside {meta.top_k}..{meta.num_experts}")
    if not 0 <= options.layer_pair < max(meta.num_layers - 1, 1):
        raise UsageError(f"--layer-pair {options.layer_pair} outside 0..{max(meta.num_layers - 2, 0)}")
    files = write_report(trace, out, options, title=args.trace)
    print(f"wrote {len(files)} files to {args.out}: {', '.join(files)}")
    return 0
