"""`moe-env generate`: greedy decode with experts offloaded through the expert cache; prints text and metrics."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from moe_env.allocation import BUDGET_SYNTAX_HELP
from moe_env.cache import PREFILL_MODES
from moe_env.embedded import DEFAULT_MODEL
from moe_env.errors import UsageError
from moe_env.links import LINKS
from moe_env.threads import add_threads_argument, set_threads

if TYPE_CHECKING:  # the engine (torch, transformers) is imported when the command runs, not to parse arguments
    from moe_env.engine import GenerationResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded model name or local HF dir ({DEFAULT_MODEL})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument(
        "--prompts", help="a UTF-8 text file, one prompt a line (blank lines skipped), served in order by one engine"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--cache-slots", default=None, help="device slots per MoE layer: top_k..num_experts or all")
    budget.add_argument("--cache-budget", default=None, help=f"device expert memory: {BUDGET_SYNTAX_HELP}")
    parser.add_argument("--allocation", default="uniform", help="how the budget is laid out: uniform, shared, "
                        "profile:TRACE (per-layer slots from a training trace)")  # fmt: skip
    parser.add_argument("--prefill", default="chunked", choices=PREFILL_MODES,
                        help="chunked: through the cache; bypass: a prompt whose experts exceed a layer's share is "
                        "computed from copies that are not installed")  # fmt: skip
    parser.add_argument(
        "--cold",
        action="store_true",
        help="with --prompts: empty the cache before every prompt (default: warm across prompts)",
    )
    parser.add_argument("--policy", default="lru", help="eviction policy spec, e.g. lru, lfu, lfu-decay:decay=0.9")
    parser.add_argument("--prefetch", default=None, help="prefetch policy spec, e.g. lookahead")
    parser.add_argument("--link", default="host", help=f"CPU only: pace copies to a link ({', '.join(LINKS)})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    add_threads_argument(parser)
    parser.add_argument("--stop-at-eos", action="store_true", help="stop when the tokenizer's EOS is generated")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"tokens", "text", "metrics"}')


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    from tqdm import tqdm

    from moe_env.engine import EngineConfig, OffloadEngine

    set_threads(args.threads)
    config = EngineConfig(
        model=args.model,
        cache_slots=args.cache_slots if args.cache_slots is not None else "all",
        cache_budget=args.cache_budget,
        allocation=args.allocation,
        prefill=args.prefill,
        warm=args.prompts is not None and not args.cold,
        policy=args.policy,
        prefetch=args.prefetch,
        link=args.link,
        device=args.device,
        dtype=args.dtype,
    )
    total = args.max_new_tokens * len(prompts)
    results: list[GenerationResult] = []
    with OffloadEngine(config) as engine, tqdm(total=total, desc="decode", file=sys.stderr) as bar:
        for prompt in prompts:
            results.append(
                engine.generate(
                    prompt, args.max_new_tokens, stop_at_eos=args.stop_at_eos, on_step=lambda s: bar.update(1)
                )
            )
    for prompt, result in zip(prompts, results, strict=True):
        show(prompt, result, args.json, with_prompt=args.prompts is not None)
    return 0


def read_prompts(path: str) -> list[str]:
    """One prompt a line; refuses a missing, unreadable or empty file with one line."""
    try:
        with open(path, encoding="utf-8") as handle:
            prompts = [line.rstrip("\n") for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --prompts {path}: {exc}") from None
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompt (one prompt a line)")
    return prompts


def show(prompt: str, result: GenerationResult, as_json: bool, with_prompt: bool) -> None:
    """JSON: one object a line ({"tokens", "text", "metrics"}, and "prompt" with --prompts); else text + table."""
    metrics = result.metrics.as_dict()
    if as_json:
        payload = {"prompt": prompt} if with_prompt else {}
        print(json.dumps({**payload, "tokens": result.tokens, "text": result.text, "metrics": metrics}))
        return
    completion = result.text if result.text is not None else " ".join(map(str, result.tokens))
    print(f"{prompt}{completion}")  # the prompt, then what the model wrote after it
    print()
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else f"{value}"
        print(f"{key:<{width}}  {shown}")
    print()
