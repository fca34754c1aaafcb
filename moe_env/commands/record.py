"""`moe-env record`: greedy-decode a prompt set through the offload engine and write an expert activation trace."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from moe_env.embedded import DEFAULT_MODEL
from moe_env.errors import UsageError
from moe_env.outputs import check_writable_file
from moe_env.prompts import Prompt, load_prompts
from moe_env.threads import add_threads_argument, set_threads

if TYPE_CHECKING:  # the engine (torch, transformers) is imported when a command runs, not to parse arguments
    from moe_env.engine import GenerationResult, OffloadEngine
    from moe_env.trace import Trace, TraceRecorder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or a local HF model directory")
    parser.add_argument(
        "--prompts", default="builtin", help="builtin, builtin:train, builtin:eval, a .txt (one a line) or .jsonl file"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    parser.add_argument("--out", required=True, help="trace file to write (.npz)")
    parser.add_argument(
        "--cache-slots", default="all", help="device slots per MoE layer (routing does not depend on it)"
    )
    parser.add_argument("--policy", default="lru", help="cache policy spec (routing does not depend on it)")
    parser.add_argument("--prefetch", default=None, help="prefetch policy spec")
    parser.add_argument("--limit", type=int, default=None, help="record only the first N prompts")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    out = check_writable_file(args.out, "--out")
    prompts = load_prompts(args.prompts)[: args.limit]
    from moe_env.engine import EngineConfig, OffloadEngine
    from moe_env.trace import save_trace

    set_threads(args.threads)
    config = EngineConfig(model=args.model, cache_slots=args.cache_slots, policy=args.policy, prefetch=args.prefetch)
    with OffloadEngine(config) as engine:
        for prompt in prompts:  # every prompt fits the model's context before the first one is decoded
            engine.check_context(engine.encode(prompt.text), args.max_new_tokens, where=f"prompt {prompt.id!r}")
        name = args.model if not Path(args.model).is_dir() else Path(args.model).resolve().name
        trace = record_trace(engine, prompts, args.max_new_tokens, model_name=name, progress=True)
    trace.meta.extra["prompts"] = args.prompts
    save_trace(trace, out)
    print(f"wrote {out}: {len(trace.sequences)} sequences, {trace.num_steps} decode steps", file=sys.stderr)
    return 0


def config_hash(model: str) -> str:
    """sha256 of the model's config.json contents (identifies the architecture a trace was recorded on)."""
    from moe_env.engine import resolve_model_dir

    return hashlib.sha256((resolve_model_dir(model) / "config.json").read_bytes()).hexdigest()


def weights_hash(model: str) -> str:
    """sha256 over the model's safetensors files (a retrained model makes its recorded traces stale)."""
    from moe_env.engine import resolve_model_dir

    digest = hashlib.sha256()
    for path in sorted(resolve_model_dir(model).glob("*.safetensors")):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def attach_recorder(engine: OffloadEngine, recorder: TraceRecorder) -> None:
    """Feed the engine's routing stream and sequence boundaries to `recorder`."""
    engine.add_observer(recorder)
    engine.on_sequence_start(recorder.on_sequence_start)

    def end(result: GenerationResult) -> None:
        recorder.on_sequence_end(result.tokens)

    engine.on_sequence_end(end)


def record_trace(
    engine: OffloadEngine, prompts: list[Prompt], max_new_tokens: int, model_name: str, progress: bool = False
) -> Trace:
    """Generate every prompt greedily and return the trace of what the engine routed."""
    from tqdm import tqdm

    from moe_env.trace import TraceMeta, TraceRecorder

    spec = engine.spec
    meta = TraceMeta(
        model=model_name,
        num_layers=spec.num_layers,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        source="record",
        config_hash=config_hash(engine.config.model),
        expert_bytes=spec.expert_bytes,
        extra={
            "max_new_tokens": max_new_tokens,
            "policy": str(engine.config.policy),
            "weights_sha256": weights_hash(engine.config.model),
        },
    )
    recorder = TraceRecorder(meta)
    attach_recorder(engine, recorder)
    bar = tqdm(prompts, desc=f"record {model_name}", unit="prompt", file=sys.stderr, disable=not progress)
    for prompt in bar:
        recorder.label(prompt.id, prompt.split)
        engine.generate(prompt.text, max_new_tokens=max_new_tokens)
    return recorder.trace()
