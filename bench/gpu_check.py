"""GPU check of the offloaded engine: exactness on CUDA, copy-engine bandwidth, and copy time hidden behind compute.

Builds its own random-weight models (no downloads): every supported family tiny, plus a Mixtral with large experts
(bf16, hidden 2048) so that copies matter. Prints one JSON summary on stdout; exits 0 with "skipped: no CUDA"
when there is no GPU, 1 when an exactness check fails.

    .venv/bin/python bench/gpu_check.py [--hidden 2048 --intermediate 4096 --layers 6 --new-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_env.engine import EngineConfig, OffloadEngine, greedy_decode
from moe_env.models import adapter_for
from moe_env.models.tiny import FAMILIES, tiny_model
from moe_env.store import PinnedExpertStore
from moe_env.transfer import CudaCopyEngine

PROMPT = list(range(3, 35))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compare(reference, model_for_engine, config: EngineConfig, new_tokens: int, device: torch.device) -> dict:
    """Tokens and logits of the offloaded engine vs the unmodified model on the same device."""
    tokens, logits, _, _ = greedy_decode(reference, PROMPT, new_tokens, device, keep_logits=True)
    with OffloadEngine.from_model(model_for_engine, config) as engine:
        result = engine.generate(PROMPT, new_tokens, keep_logits=True)
    diffs = [float((a - b).abs().max()) for a, b in zip(logits, result.logits, strict=True)]
    return {
        "tokens_equal": tokens == result.tokens,
        "bitwise": all(torch.equal(a, b) for a, b in zip(logits, result.logits, strict=True)),
        "max_abs_logit_diff": max(diffs),
        "hit_rate": result.metrics.hit_rate,
    }


def tiny_families(device: torch.device) -> dict:
    out = {}
    for family in FAMILIES:
        reference = tiny_model(family).to(device)
        top_k = adapter_for(reference).top_k
        config = EngineConfig(cache_slots=top_k, policy="lru", prefetch="lookahead", device=str(device))
        out[family] = compare(reference, copy.deepcopy(reference), config, 12, device)
        log(f"tiny {family}: {out[family]}")
    return out


def big_mixtral(args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    with torch.device(device):
        model = tiny_model(
            "mixtral", seed=0, dtype=torch.bfloat16, vocab_size=4096, hidden_size=args.hidden,
            intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=16,
            num_key_value_heads=4, head_dim=args.hidden // 16, initializer_range=0.02,
        )  # fmt: skip
    return model


def bandwidth(adapter, device: torch.device, copies: int) -> dict:
    """GB/s of the copy engine (side stream, events) vs a plain pinned .to(device, non_blocking=True) loop."""
    store = PinnedExpertStore(adapter)
    sources = [store.source(layer, expert) for layer in range(store.num_layers) for expert in range(store.num_experts)]
    nbytes = sources[0].numel() * sources[0].element_size()
    slots = [torch.empty_like(sources[0], device=device) for _ in range(4)]
    engine = CudaCopyEngine(device)

    def engine_run() -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(copies):
            engine.submit(slots[i % len(slots)], sources[i % len(sources)])
        torch.cuda.synchronize(device)
        return copies * nbytes / (time.perf_counter() - start) / 1e9

    def plain_run() -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        kept = [sources[i % len(sources)].to(device, non_blocking=True) for i in range(copies)]
        torch.cuda.synchronize(device)
        del kept
        return copies * nbytes / (time.perf_counter() - start) / 1e9

    engine_run(), plain_run()  # warm up
    engine_gbps = statistics.median(engine_run() for _ in range(3))
    plain_gbps = statistics.median(plain_run() for _ in range(3))
    engine.reset_stats()
    return {
        "expert_mib": nbytes / 2**20,
        "copies": copies,
        "copy_engine_gbps": engine_gbps,
        "plain_to_device_gbps": plain_gbps,
        "ratio": engine_gbps / plain_gbps,
    }


def overlap(base, device: torch.device, new_tokens: int) -> dict:
    """Stall vs total copy time for several cache set-ups on the big model; tokens/s vs the default resident."""
    adapter = adapter_for(base)
    top_k, num_experts = adapter.top_k, adapter.num_experts
    rows: dict[str, dict] = {}
    for implementation in ("grouped_mm", "eager"):  # transformers' default, and the loop the runtime reproduces
        resident = copy.deepcopy(base)
        try:
            resident.set_experts_implementation(implementation)
        except (ValueError, ImportError, RuntimeError) as exc:
            rows[f"resident_{implementation}"] = {"error": str(exc).splitlines()[0]}
            continue
        greedy_decode(resident, PROMPT, 4, device)
        tokens, _, _, decode_s = greedy_decode(resident, PROMPT, new_tokens, device)
        rows[f"resident_{implementation}"] = {"tokens_per_s": (len(tokens) - 1) / decode_s}
        del resident
    resident_rate = rows.get("resident_grouped_mm", {}).get("tokens_per_s") or rows["resident_eager"]["tokens_per_s"]
    setups = [
        ("all", num_experts, None, True),
        ("mid_lru", (top_k + num_experts) // 2, None, True),
        ("topk_lru", top_k, None, True),
        ("topk_lru_lookahead", top_k, "lookahead", True),
        ("no_cache", top_k, None, False),
    ]
    for name, slots, prefetch, keep in setups:
        config = EngineConfig(cache_slots=slots, prefetch=prefetch, device=str(device), keep_experts=keep)
        with OffloadEngine.from_model(copy.deepcopy(base), config) as engine:
            engine.generate(PROMPT, 4)  # warm up
            result = engine.generate(PROMPT, new_tokens)
        m = result.metrics
        rows[name] = {
            "slots": slots,
            "hit_rate": m.hit_rate,
            "tokens_per_s": m.tokens_per_s,
            "vs_resident": m.tokens_per_s / resident_rate,
            "copy_s": m.copy_s,
            "stall_s": m.stall_s,
            "hidden_fraction": 1.0 - m.stall_s / m.copy_s if m.copy_s > 0 else None,
            "gib_moved": m.bytes_moved / 2**30,
            "peak_gib": m.peak_cache_bytes / 2**30,
        }
        log(f"overlap {name}: {rows[name]}")
    return rows


def guarded(summary: dict, key: str, fn: Callable[[], object]) -> None:
    """Run one section; a failure is recorded in the summary (with its traceback on stderr), not fatal."""
    try:
        summary[key] = fn()
    except Exception as exc:
        traceback.print_exc()
        summary[key] = {"error": f"{type(exc).__name__}: {exc}"}
    log(f"{key}: {summary[key]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--copies", type=int, default=64)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    device = torch.device("cuda")
    start = time.perf_counter()
    summary: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    guarded(summary, "tiny_exactness", lambda: tiny_families(device))

    base = big_mixtral(args, device)
    adapter = adapter_for(base)
    summary["big_model"] = {
        "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
        "experts": adapter.num_experts, "top_k": adapter.top_k, "expert_mib": adapter.shape.nbytes / 2**20,
    }  # fmt: skip
    for slots, prefetch in ((adapter.top_k, "lookahead"), (adapter.num_experts, None)):
        config = EngineConfig(cache_slots=slots, prefetch=prefetch, device="cuda")
        key = f"big_exactness_slots{slots}_{prefetch or 'noprefetch'}"
        guarded(summary, key, lambda config=config: compare(base, copy.deepcopy(base), config, args.new_tokens, device))
    guarded(summary, "bandwidth", lambda: bandwidth(adapter, device, args.copies))
    guarded(summary, "overlap", lambda: overlap(base, device, args.new_tokens))
    summary["seconds"] = time.perf_counter() - start
    print(json.dumps(summary, indent=2))
    checks = [v for k, v in summary.items() if k.startswith("big_exactness")]
    tiny = summary["tiny_exactness"]
    checks += list(tiny.values()) if "error" not in tiny else [tiny]
    return 0 if all(r.get("tokens_equal") for r in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
