"""`moe-env generate`: greedy decode with experts offloaded through the expert cache; prints text and metrics."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm import tqdm

from moe_env.engine import DEFAULT_MODEL, EngineConfig, OffloadEngine
from moe_env.errors import UsageError
from moe_env.transfer import LINKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded model name or local HF dir ({DEFAULT_MODEL})")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy)")
    parser.add_argument("--cache-slots", default="all", help="device slots per MoE layer: top_k..num_experts or all")
    parser.add_argument("--policy", default="lru", help="eviction policy spec, e.g. lru, lfu, lfu-decay:decay=0.9")
    parser.add_argument("--prefetch", default=None, help="prefetch policy spec, e.g. lookahead")
    parser.add_argument("--link", default="host", help=f"CPU only: pace copies to a link ({', '.join(LINKS)})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop when the tokenizer's EOS is generated")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"tokens", "text", "metrics"}')


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = EngineConfig(
        model=args.model,
        cache_slots=args.cache_slots,
        policy=args.policy,
        prefetch=args.prefetch,
        link=args.link,
        device=args.device,
        dtype=args.dtype,
    )
    with OffloadEngine(config) as engine, tqdm(total=args.max_new_tokens, desc="decode", file=sys.stderr) as bar:
        result = engine.generate(
            args.prompt, args.max_new_tokens, stop_at_eos=args.stop_at_eos, on_step=lambda step: bar.update(1)
        )
    metrics = result.metrics.as_dict()
    if args.json:
        print(json.dumps({"tokens": result.tokens, "text": result.text, "metrics": metrics}))
        return 0
    completion = result.text if result.text is not None else " ".join(map(str, result.tokens))
    print(f"{args.prompt}{completion}")  # the prompt, then what the model wrote after it
    print()
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else f"{value}"
        print(f"{key:<{width}}  {shown}")
    return 0
