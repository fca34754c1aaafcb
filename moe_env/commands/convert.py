"""`moe-env convert`: import an external routing log as a trace: a JSONL log (problem_id, layer, experts[,
gating_probs]), one per-prompt CSV log or a directory of them (Layer ID, Batch Number, Token, Activated Expert IDs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_env.errors import UsageError
from moe_env.trace import Trace, save_trace
from moe_env.trace_csv import import_csv_routing
from moe_env.trace_jsonl import import_jsonl_routing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="JSONL routing log, CSV routing log, or a directory of per-prompt CSV logs")
    parser.add_argument("--out", required=True, help="trace file to write (.npz)")
    parser.add_argument(
        "--model-name",
        default=None,
        help="the model the log comes from (CSV default: deepseek-v2-lite; a known model fixes the expert count)",
    )
    parser.add_argument(
        "--num-experts", type=int, default=None, help="experts per layer (default: the model's, else largest id + 1)"
    )


def import_log(source: Path, model_name: str | None, num_experts: int | None) -> Trace:
    if source.is_dir() or source.suffix == ".csv":
        return import_csv_routing(source, model_name=model_name, num_experts=num_experts)
    if source.suffix == ".jsonl":
        return import_jsonl_routing(source, model_name=model_name, num_experts=num_experts)
    raise UsageError(f"{source}: not a .jsonl or .csv routing log nor a directory of .csv logs")


def run(args: argparse.Namespace) -> int:
    source = Path(args.input)
    if not source.exists():
        raise UsageError(f"no such input file or directory: {args.input}")
    if args.num_experts is not None and args.num_experts < 1:
        raise UsageError(f"--num-experts must be >= 1, got {args.num_experts}")
    trace = import_log(source, args.model_name, args.num_experts)
    out = save_trace(trace, args.out)
    meta = trace.meta
    print(
        f"wrote {out}: {meta.model}, {len(trace.sequences)} sequences, {trace.num_steps} decode steps, "
        f"{meta.num_layers} layers, {meta.num_experts} experts, top-{meta.top_k}",
        file=sys.stderr,
    )
    return 0
