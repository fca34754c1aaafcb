"""`moe-env trace-info`: the shape of a trace and its routing statistics (moe_env.routing_stats)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from moe_env.routing_stats import routing_statistics
from moe_env.trace import Trace, load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="trace file, JSONL routing log, or builtin:MODEL[/SPLIT]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    summary = trace_summary(trace)
    if args.json:
        print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}))
        return 0
    meta = trace.meta
    print(f"trace            {args.trace}")
    print(f"model            {meta.model} (source {meta.source})")
    for key, value in summary.items():
        print(f"{key:<32} {value:.4f}" if isinstance(value, float) else f"{key:<32} {value}")
    return 0


def trace_summary(trace: Trace) -> dict[str, int | float]:
    """Sequences, decode steps, shape, and routing statistics over the decode cells (absent cells excluded)."""
    meta = trace.meta
    stats = decode_routing_stats(trace)
    return {
        "sequences": len(trace.sequences),
        "tokens": trace.num_steps,
        "layers": meta.num_layers,
        "experts": meta.num_experts,
        "top_k": meta.top_k,
        **stats,
    }


def decode_routing_stats(trace: Trace) -> dict[str, float]:
    """usage_entropy_ratio_min, min_expert_share, prev_token_reuse_over_chance of the decode cells.

    routing_statistics needs complete [tokens, layers, k] arrays, so each layer is measured on its own runs of
    present cells (a run is passed as its own selection array: prev-token pairs never span an absent cell), then
    combined as routing_statistics combines layers: min over layers, mean reuse over layers. With no absent cell
    this equals routing_statistics on the whole arrays.
    """
    meta = trace.meta
    ratios, shares, reuses = [], [], []
    for layer in range(meta.num_layers):
        runs = [run for seq in trace.sequences for run in _present_runs(seq.experts[:, layer])]
        if not runs:
            continue
        stats = routing_statistics([run[:, None, :] for run in runs], meta.num_experts)
        ratios.append(stats.usage_entropy_ratio_min)
        shares.append(stats.min_expert_share)
        reuses.append(stats.prev_token_reuse)
    nan = float("nan")
    finite_reuse = [r for r in reuses if not math.isnan(r)]
    chance = meta.top_k / meta.num_experts
    return {
        "usage_entropy_ratio_min": min(ratios, default=nan),
        "min_expert_share": min(shares, default=nan),
        "prev_token_reuse_over_chance": float(np.mean(finite_reuse)) / chance if finite_reuse else nan,
    }


def _present_runs(cells: np.ndarray) -> list[np.ndarray]:
    """Maximal runs of consecutive present cells of one layer ([T, k] -> list of [n, k], int64)."""
    present = cells[:, 0] >= 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], present.astype(np.int8), [0]))))
    return [cells[start:end].astype(np.int64) for start, end in zip(edges[::2], edges[1::2], strict=True)]
