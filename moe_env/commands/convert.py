"""`moe-env convert`: import an external JSONL routing log (problem_id, layer, experts, gating_probs) as a trace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_env.errors import UsageError
from moe_env.trace import import_jsonl_routing, save_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="JSONL routing log, one record a line")
    parser.add_argument("--out", required=True, help="trace file to write (.npz)")
    parser.add_argument("--model-name", default=None, help="model name stored in the trace (default: the file name)")
    parser.add_argument(
        "--num-experts", type=int, default=None, help="experts per layer (default: the largest id seen + 1)"
    )


def run(args: argparse.Namespace) -> int:
    source = Path(args.input)
    if not source.is_file():
        raise UsageError(f"no such input file: {args.input}")
    if args.num_experts is not None and args.num_experts < 1:
        raise UsageError(f"--num-experts must be >= 1, got {args.num_experts}")
    trace = import_jsonl_routing(source, model_name=args.model_name, num_experts=args.num_experts)
    out = save_trace(trace, args.out)
    meta = trace.meta
    print(
        f"wrote {out}: {len(trace.sequences)} sequences, {trace.num_steps} decode steps, {meta.num_layers} layers, "
        f"{meta.num_experts} experts, top-{meta.top_k}",
        file=sys.stderr,
    )
    return 0
