"""Decode speed of the offloaded engine vs the unmodified model, side by side (medians of repeated runs).

Rows: all experts resident (the unmodified model with transformers' default grouped_mm experts, the baseline of
the ratios; and with the eager per-expert loop, which the offloaded runtime reproduces bitwise), the offloaded
engine with the cache at top-k, mid and all slots per layer under lru and lru+lookahead, and no cache at all
(every expert access is a load). Ratios are decode tokens/s relative to the default resident model. On a shared
CPU box the figures are noisy: compare rows of one run, not runs.

    .venv/bin/python bench/engine_speed.py                                # the embedded default model
    .venv/bin/python bench/engine_speed.py --random --hidden 512 --intermediate 1024 --link pcie4
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_env.engine import DEFAULT_MODEL, EngineConfig, OffloadEngine, greedy_decode, load_model
from moe_env.models import adapter_for
from moe_env.models.tiny import tiny_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or local HF dir")
    p.add_argument("--random", action="store_true", help="a random-weight Mixtral instead (sizes below)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", default="def fibonacci(n):\n    ")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared box)")
    p.add_argument("--link", default="host", help="pace CPU copies to this link (host: unpaced)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.random:
        base = tiny_model(
            "mixtral", seed=0, vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
        )  # fmt: skip
        tokenizer = None
        prompt_ids = list(range(1, 17))
        name = f"random mixtral H={args.hidden} I={args.intermediate} L={args.layers}"
    else:
        base, tokenizer, _ = load_model(args.model, None)
        prompt_ids = list(tokenizer(args.prompt, add_special_tokens=False)["input_ids"]) if tokenizer else [1, 2, 3]
        name = args.model
    adapter = adapter_for(base)
    top_k, num_experts = adapter.top_k, adapter.num_experts
    mid = (top_k + num_experts) // 2

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(
        f"model: {name}; {len(adapter.layers)} MoE layers x {num_experts} experts, top-{top_k}, "
        f"expert {adapter.shape.nbytes / 2**20:.2f} MiB {adapter.shape.dtype}; device {device}; link {args.link}; "
        f"threads {args.threads}; prompt {len(prompt_ids)} tokens, {args.new_tokens} new; median of {args.repeats}"
    )

    rows = []
    for label, implementation in (
        ("resident (transformers default)", "grouped_mm"),
        ("resident", "eager"),
    ):
        resident = copy.deepcopy(base).to(device)
        resident.set_experts_implementation(implementation)
        rates = []
        for _ in range(args.repeats + 1):  # the first run warms up
            tokens, _, _, decode_s = greedy_decode(resident, prompt_ids, args.new_tokens, device)
            rates.append((len(tokens) - 1) / decode_s)
        rows.append((f"{label}, {implementation} experts", "-", None, statistics.median(rates[1:]), None))
        del resident
    resident_rate = rows[0][3]

    configs = [
        (f"offload all={num_experts} lru", num_experts, "lru", None, True),
        (f"offload mid={mid} lru", mid, "lru", None, True),
        (f"offload mid={mid} lru+lookahead", mid, "lru", "lookahead", True),
        (f"offload top-k={top_k} lru", top_k, "lru", None, True),
        (f"offload top-k={top_k} lru+lookahead", top_k, "lru", "lookahead", True),
        ("no cache (load every access)", top_k, "lru", None, False),
    ]
    for label, slots, policy, prefetch, keep in configs:
        config = EngineConfig(
            cache_slots=slots, policy=policy, prefetch=prefetch, link=args.link, device=args.device, keep_experts=keep
        )
        with OffloadEngine.from_model(copy.deepcopy(base), config, tokenizer) as engine:
            results = [engine.generate(prompt_ids, args.new_tokens) for _ in range(args.repeats + 1)][1:]
        rate = statistics.median(r.metrics.tokens_per_s for r in results)
        rows.append((label, f"{results[0].metrics.hit_rate:.3f}", results, rate, rate / resident_rate))

    print()
    print(f"{'configuration':<40} {'hit_rate':>8} {'tok/s':>9} {'vs resident':>11} {'stall_s':>8} {'MiB moved':>10}")
    for label, hit_rate, results, rate, ratio in rows:
        if results is None:
            print(f"{label:<40} {hit_rate:>8} {rate:>9.1f} {rate / resident_rate:>10.2f}x {'-':>8} {'-':>10}")
            continue
        stall = statistics.median(r.metrics.stall_s for r in results)
        moved = statistics.median(r.metrics.bytes_moved for r in results) / 2**20
        print(f"{label:<40} {hit_rate:>8} {rate:>9.1f} {ratio:>10.2f}x {stall:>8.3f} {moved:>10.1f}")
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"\n({time.perf_counter() - start:.0f} s)")
    raise SystemExit(code)
