"""moe-env against what users run instead, side by side at equal memory, in one run.

For one model and a list of memory budgets for the experts (``--cache-budget``, the project's syntax: bytes ``6GiB``,
a fraction of all expert bytes ``0.25``, or total slots ``96``; floored to whole experts), the same greedy decode of
the same prompts under:
  resident        transformers, every weight in RAM (the upper bound; no budget)
  accelerate      transformers + accelerate offloading: device_map = infer_auto_device_map(max_memory={"cpu":
                  budget + non-expert bytes}), the rest to "disk" with an offload_folder (on CUDA: GPU budget, the
                  rest in CPU RAM)
  static          llama.cpp-style static placement: the experts most used in a warm-up decode of a separate
                  calibration prompt pinned in RAM for good, every other routed expert read from the slow tier at
                  each use into one scratch buffer (no cache); pinned + scratch fit the same budget
  moe-env:P       moe-env's engine with the budget as its cache (laid out by --allocation), policy P (lru,
                  lfu-decay, with lookahead prefetch, and ppo / flat-predictor when their plug-in loads a checkpoint
                  for this model);
                  P@warm keeps the cache across requests (the warm-up decode included: a serving process),
                  P@bypass computes a prefill whose experts exceed a layer's slots from copies not installed
Each configuration runs in a fresh subprocess (its own resident-set high-water mark), loads, warms up, then decodes
every prompt `--runs` times. Before every forward the slow tier is made cold (posix_fadvise DONTNEED on its files;
moe-env's store maps nothing): this emulates a machine whose RAM beyond the budget cannot cache it,
so reads outside the budget are real disk reads, counted from /proc/self/io. Reported: decode tokens/s (median of
runs), time to first token (median), peak RSS during decode (VmHWM reset after loading; on CUDA max allocated),
bytes read from the slow tier per run, whether the tokens equal the resident model's, speedup vs accelerate.

    .venv/bin/python bench/peers.py --quick                       # < 1 min: a small random OLMoE, one budget
    .venv/bin/python bench/peers.py --model olmoe-shapes           # real OLMoE-1B-7B layer shapes, 4 layers
    .venv/bin/python bench/peers.py --model tiny-olmoe --cache-budget 0.25,0.5 --json
    .venv/bin/python bench/peers.py --cache-budget 0.25,1GiB,128 --json       # a fraction, bytes, total slots
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from moe_env import peers
from moe_env.allocation import BUDGET_SYNTAX_HELP, parse_budget
from moe_env.costmodel import CostModel, ExpertProfile, HardwareProfile
from moe_env.engine import EngineConfig, check_cache_options
from moe_env.error_boundary import run_reporting_errors
from moe_env.errors import UsageError
from moe_env.store_cache import cache_root

RESULT_TAG = "PEERS_RESULT "
MOE_POLICIES = "lru,lfu-decay,lru+lookahead,lfu-decay+lookahead"
LEARNED = ("ppo", "flat-predictor")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=peers.OLMOE_SHAPES, help="olmoe-shapes, an embedded model or a local HF dir")
    p.add_argument("--layers", type=int, default=4, help="olmoe-shapes: decoder layers (OLMoE-1B-7B has 16)")
    p.add_argument("--vocab", type=int, default=4096, help="olmoe-shapes: vocabulary size (OLMoE-1B-7B: 50304)")
    p.add_argument("--cache-budget", default="0.25,0.5,1.0", help="expert memory budgets, comma-separated, each "
                   f"{BUDGET_SYNTAX_HELP}; floored to whole experts")  # fmt: skip
    p.add_argument("--budgets", help=argparse.SUPPRESS)  # retired: its bare integers were bytes, now they are slots
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (random ids for a random model)")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared box)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--policies", default=MOE_POLICIES, help="moe-env policies (EVICT[+PREFETCH][@MODES], MODES: "
                   "warm, bypass or warm-bypass: a cache kept across requests, prefill bypass); learned ones "
                   "(ppo, flat-predictor) are added when their plug-in loads")  # fmt: skip
    p.add_argument("--allocation", default="uniform", help="moe-env: uniform, shared (the budget in one pool) or "
                   "profile:TRACE")  # fmt: skip
    p.add_argument("--configs", default="", help="comma-separated subset (resident,accelerate,static,moe-env)")
    p.add_argument("--page-cache", choices=("drop", "keep"), default="drop", help="drop: cold slow tier each forward")
    p.add_argument("--cache-dir", default=str(cache_root() / "peers"))  # not a store entry: never pruned
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    p.add_argument("--quick", action="store_true", help="a reduced run in under a minute")
    p.add_argument("--in-process", action="store_true", help="no subprocess per configuration (fast start; peak RSS "
                   "then includes what earlier configurations left; the default with --quick)")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.budgets is not None:
        raise UsageError(f"--budgets is retired (a bare integer was bytes there); use --cache-budget {args.budgets} "
                         "with moe-env's budget syntax: 6GiB (bytes), 0.25 (a fraction), 96 (total slots)")  # fmt: skip
    check_budgets(args.cache_budget)
    check_cache_options(EngineConfig(allocation=args.allocation))
    if args.quick:
        if args.model == peers.OLMOE_SHAPES:
            args.model = "quick-olmoe"
        args.cache_budget = "0.5" if args.cache_budget == p.get_default("cache_budget") else args.cache_budget
        args.prompts, args.new_tokens, args.runs, args.prompt_len = 1, 6, 1, 8
        args.in_process = True
    return args


# -- the model and prompts -------------------------------------------------------------------------------------
def quick_model_dir(root: Path) -> Path:
    """A small random OLMoE (hidden 256, 16 experts of 128, top-4, 2 layers): the --quick path and the test."""
    directory = root / "quick-olmoe-src"
    if not (directory / "config.json").exists():
        from moe_env.models.tiny import tiny_model

        model = tiny_model(
            "olmoe", seed=0, dtype=torch.bfloat16, vocab_size=512, hidden_size=256, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        )  # fmt: skip
        model.config.dtype = "bfloat16"
        model.save_pretrained(directory)
    return directory


def prepare(args: argparse.Namespace, root: Path) -> Path:
    model = args.model
    if model == "quick-olmoe":
        model = str(quick_model_dir(root))
    spec = {"mode": "prepare", "model": model, "layers": args.layers, "vocab": args.vocab, "root": str(root)}
    out = run_worker(spec, args)
    return Path(out["prepared"])


def make_prompts(prepared: Path, count: int, length: int) -> tuple[list[list[int]], list[int]]:
    """`count` prompts and one calibration prompt (static placement's warm-up), as token ids."""
    src = peers.source_dir(prepared)
    tokenizer = None
    if (src / "tokenizer.json").exists() or (src / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
    if tokenizer is not None:
        from moe_env.prompts import load_prompts

        texts = [p.text for p in load_prompts("builtin:eval")]
        ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"])[:length] for t in texts]
        ids = [i for i in ids if i][: count + 1]
        return ids[:count], ids[count]
    vocab = peers.model_shape(prepared)["vocab"]
    rng = np.random.default_rng(1234)
    ids = [rng.integers(0, vocab, size=length).tolist() for _ in range(count + 1)]
    return ids[:count], ids[count]


def check_budgets(spec: str) -> list[str]:
    """The budgets of --cache-budget, each checked (moe_env.allocation.parse_budget) before any work starts."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UsageError(f"--cache-budget is empty; give {BUDGET_SYNTAX_HELP.replace('%%', '%')}")
    for item in items:
        parse_budget(item)
    return items


def parse_budgets(spec: str, num_layers: int, num_experts: int, expert_bytes: int) -> list[tuple[str, int]]:
    """(label, total slots) per budget of --cache-budget: whole experts, at most every expert of the model."""
    out = []
    for item in check_budgets(spec):
        budget = parse_budget(item)
        if budget.fraction is not None:
            label = f"{budget.fraction:g}x"
        else:
            label = item if budget.bytes is not None else f"{item} slots"
        out.append((label, budget.total_slots(num_layers, num_experts, expert_bytes)))
    return out


# -- subprocess plumbing ----------------------------------------------------------------------------------------
def run_worker(spec: dict, args: argparse.Namespace, timeout: float = 1800) -> dict:
    """Run one configuration in a fresh subprocess (its own peak RSS), or in this process with --in-process."""
    spec = {**spec, "threads": args.threads, "device": args.device, "page_cache": args.page_cache}
    if args.in_process:
        try:
            return json.loads(json.dumps(worker(spec)))
        except Exception as exc:
            traceback.print_exc()
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        finally:
            import gc

            gc.collect()
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail)}


def worker(spec: dict) -> dict:
    torch.set_num_threads(int(spec.get("threads", 1)))
    if spec["mode"] == "prepare":
        prepared = peers.prepare_model_dir(spec["model"], Path(spec["root"]), spec["layers"], spec["vocab"])
        return {"prepared": str(prepared)}
    if spec["mode"] == "calibrate":
        return calibrate(Path(spec["prepared"]))
    return measure(spec)


def _decode_all(decode, prompts, new_tokens, drop) -> tuple[list[list[int]], float, list[float], float]:
    """Every prompt once: (tokens per prompt, decode tokens/s over the run, ttfts, seconds)."""
    tokens, ttfts, decode_s, decode_tokens = [], [], 0.0, 0
    for ids in prompts:
        drop()
        out, ttft, seconds = decode(ids, new_tokens, drop)
        tokens.append(out)
        ttfts.append(ttft)
        decode_s += seconds
        decode_tokens += len(out) - 1
    return tokens, decode_tokens / decode_s if decode_s > 0 else 0.0, ttfts, decode_s


def measure(spec: dict) -> dict:
    cleanup: list[Path] = []
    try:
        return _measure(spec, cleanup)
    finally:
        import shutil

        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)


def _measure(spec: dict, cleanup: list[Path]) -> dict:
    from moe_env.engine import greedy_decode

    prepared, config = Path(spec["prepared"]), spec["config"]
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    prompts, new_tokens, runs = spec["prompts"], spec["new_tokens"], spec["runs"]
    memory = peers.ProcessMemory()
    extra: dict = {}
    moved = lambda: 0  # noqa: E731  (bytes the configuration itself counts as moved from the slow tier)
    start = time.perf_counter()
    shape = peers.model_shape(prepared)
    source = peers.source_dir(prepared)
    source_files = sorted(source.glob("*.safetensors"))
    tier = peers.SlowTier([])

    def plain_decode(model):
        def decode(ids, n, drop):
            out, _, ttft, seconds = greedy_decode(model, ids, n, device, before_forward=drop)
            return out, ttft, seconds

        return decode

    if config == "resident":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", experts_implementation="eager").eval()
        model.to(device)
        decode = plain_decode(model)
    elif config == "accelerate":
        budget = spec["budget_bytes"] + peers.non_expert_bytes(prepared)
        offload = Path(tempfile.mkdtemp(prefix="peers-offload-", dir=prepared))
        cleanup.append(offload)
        if cuda:
            model, device_map = cuda_accelerate_model(source, budget)
        else:
            model, device_map = peers.accelerate_model(prepared, budget, offload)
        extra["device_map"] = summarize_map(device_map)
        extra["offloaded_bytes"] = offloaded_bytes(model, device_map)
        tier = peers.SlowTier([*source_files, *offload.rglob("*")])
        decode = plain_decode(model)
        if cuda:
            moved = lambda: extra["offloaded_bytes"] * forwards[0]  # noqa: E731
    elif config == "static" or config.startswith("moe-env:"):
        from moe_env.models import adapter_for
        from moe_env.store import DiskExpertStore, PinnedExpertStore

        if cuda:  # the engine's CUDA host tier is pinned RAM packed from the model's own expert weights
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", experts_implementation="eager").eval()
        else:
            model = peers.load_skeleton(prepared)
        if config == "static":
            adapter = adapter_for(model)
            store = (
                PinnedExpertStore(adapter)
                if cuda
                else DiskExpertStore(
                    prepared / peers.STORE_FILE, adapter.shape, len(adapter.layers), adapter.num_experts
                )
            )
            static = peers.StaticPlacement(model, store, device)
            model.to(device)
            tier = peers.SlowTier([prepared / peers.STORE_FILE])
            decode = plain_decode(model)
            tier.drop()
            decode(spec["calibration"], new_tokens, tier.drop)  # warm-up on a separate prompt: usage counts
            extra["pinned"] = static.pin(spec["slots"] - 1)
            extra["pinned_per_layer"] = spec["slots"] - 1
            moved = lambda: static.bytes_read  # noqa: E731
        else:
            from moe_env.engine import EngineConfig, OffloadEngine

            policy, prefetch, modes = moe_env_config(config)
            engine = OffloadEngine.from_model(
                model,
                EngineConfig(
                    cache_budget=str(spec["total_slots"]), policy=policy, prefetch=prefetch, store_dir=str(prepared),
                    device=str(device), allocation=spec.get("allocation", "uniform"), warm="warm" in modes,
                    prefill="bypass" if "bypass" in modes else "chunked",
                ),
            )  # fmt: skip
            tier = peers.SlowTier([prepared / peers.STORE_FILE])
            results: list = []

            def decode(ids, n, drop):
                result = engine.generate(ids, n, on_step=drop)
                results.append(result)
                return result.tokens, result.metrics.ttft_s, result.metrics.decode_s

            moved = lambda: sum(r.metrics.bytes_moved for r in results)  # noqa: E731
            if spec.get("trace"):
                extra["trace"] = record_trace(engine, prompts, new_tokens, spec["trace"], shape)
    else:
        raise ValueError(f"unknown configuration {config!r}")

    drop = tier.drop if spec["page_cache"] == "drop" else (lambda *_: None)
    forwards = [0]

    def counted_drop(*a):
        forwards[0] += 1
        drop()

    extra["load_s"] = time.perf_counter() - start
    decode(prompts[0], min(3, new_tokens), drop)  # warm-up: allocator, first-call costs
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    memory.reset()
    read0, moved0 = peers.read_bytes(), moved()
    forwards[0] = 0
    rates, ttfts, tokens = [], [], None
    for _ in range(runs):
        run_tokens, rate, run_ttfts, _ = _decode_all(decode, prompts, new_tokens, counted_drop)
        tokens = tokens or run_tokens
        if run_tokens != tokens:
            extra["nondeterministic"] = True
        rates.append(rate)
        ttfts.extend(run_ttfts)
    peak = torch.cuda.max_memory_allocated(device) if cuda else memory.peak_bytes()
    return {
        "tokens": tokens,
        "tokens_per_s": statistics.median(rates),
        "rates": rates,
        "ttft_s": statistics.median(ttfts),
        "peak_bytes": peak,
        "peak_is_decode_only": cuda or memory.resettable,
        "lifetime_peak_bytes": memory.lifetime_peak_bytes(),
        "slow_tier_bytes": (moved() - moved0 if cuda else peers.read_bytes() - read0) // runs,
        "moved_bytes": (moved() - moved0) // runs,
        "hit_rate": _hit_rate(locals().get("results")),
        "extra": extra,
    }


def moe_env_config(config: str) -> tuple[str, str | None, set[str]]:
    """``moe-env:EVICT[+PREFETCH][@MODES]`` -> (eviction, prefetch or None, modes: warm, bypass)."""
    policies, _, modes = config.removeprefix("moe-env:").partition("@")
    policy, _, prefetch = policies.partition("+")
    return policy, prefetch or None, set(modes.split("-")) if modes else set()


def _hit_rate(results) -> float | None:
    if not results:
        return None
    hits = sum(r.metrics.hits for r in results)
    misses = sum(r.metrics.misses for r in results)
    return hits / (hits + misses) if hits + misses else None


def cuda_accelerate_model(source: Path, budget: int):
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    device_map = infer_auto_device_map(
        empty, max_memory={0: budget, "cpu": 1 << 40}, no_split_module_classes=list(empty._no_split_modules or [])
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype="auto", device_map=dict(device_map), experts_implementation="eager"
    )
    return model.eval(), dict(device_map)


def summarize_map(device_map: dict) -> dict:
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return {"modules": counts, "map": {k: str(v) for k, v in device_map.items()}}


def offloaded_bytes(model, device_map: dict) -> int:
    """Bytes of the parameters placed off the execution device (loaded at every forward)."""
    total = 0
    main_device = next(iter(device_map.values()))
    off = {k for k, v in device_map.items() if str(v) in ("disk", "cpu") and v != main_device}
    for name, param in model.named_parameters(remove_duplicate=False):
        if any(name == k or name.startswith(k + ".") for k in off):
            total += param.numel() * param.element_size()
    return total


def record_trace(engine, prompts, new_tokens, path: str, shape: dict) -> str:
    """One untimed pass over the prompts with a TraceRecorder attached: the routing the forecast replays."""
    from moe_env.trace import Trace, TraceMeta, TraceRecorder, save_trace

    meta = TraceMeta(
        model=engine.spec.name, num_layers=shape["layers"], num_experts=shape["experts"], top_k=shape["top_k"],
        source="record", expert_bytes=shape["expert_bytes"],
    )  # fmt: skip
    recorder = TraceRecorder(meta)
    engine.add_observer(recorder)
    try:
        for i, ids in enumerate(prompts):
            recorder.label(f"p{i}")
            recorder.on_sequence_start(ids)
            result = engine.generate(ids, new_tokens)
            recorder.on_sequence_end(result.tokens)
    finally:
        engine.runtime.observers.remove(recorder)
    save_trace(Trace(meta=meta, sequences=recorder.sequences), path)
    return path


# -- calibration for the forecast -----------------------------------------------------------------------------
def calibrate(prepared: Path) -> dict:
    """The slow tier's cold-read bandwidth as moe-env copies (the store's pread into a slot, pages dropped first),
    the same reads through a memory map (the store's former path, for comparison) and one expert's compute time for
    one token: the cost model's link and device speed on this machine."""
    from moe_env.checkpoint import read_header
    from moe_env.models.base import ExpertShape
    from moe_env.store import DiskExpertStore

    shape = peers.model_shape(prepared)
    path = prepared / peers.STORE_FILE
    header = read_header(path)
    first = next(iter(header.values()))
    layers, experts = shape["layers"], shape["experts"]
    store = DiskExpertStore(path, ExpertShape(shape["hidden"], shape["expert_intermediate"], first.dtype), layers,
                            experts)  # fmt: skip
    rng = np.random.default_rng(0)
    picks = [(int(i) // experts, int(i) % experts) for i in rng.choice(layers * experts, size=min(24, layers * experts),
                                                                         replace=False)]  # fmt: skip
    dst = torch.empty(store.shape.numel, dtype=store.shape.dtype)
    tier = peers.SlowTier([path])
    times = []
    for layer, expert in picks:
        tier.drop()
        t = time.perf_counter()
        store.read_into(layer, expert, dst)
        times.append(time.perf_counter() - t)
    store.close()
    copy_s = statistics.median(times)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    raw = dst.view(torch.uint8)
    times = []
    for layer, expert in picks:
        info = header[f"layer{layer}.expert{expert}"]
        mapped._mmap.madvise(__import__("mmap").MADV_DONTNEED)
        tier.drop()
        t = time.perf_counter()
        raw.copy_(torch.from_numpy(mapped[info.begin : info.end]))
        times.append(time.perf_counter() - t)
    mmap_s = statistics.median(times)
    del mapped
    hidden, inter = shape["hidden"], shape["expert_intermediate"]
    dtype = torch.bfloat16 if shape["dtype"] == "bfloat16" else torch.float32
    gate_up = torch.randn(2 * inter, hidden).to(dtype)
    down = torch.randn(hidden, inter).to(dtype)
    x = torch.randn(1, hidden).to(dtype)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        g, u = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
        torch.nn.functional.linear(torch.nn.functional.silu(g) * u, down)
        times.append(time.perf_counter() - t)
    return {
        "copy_s": copy_s,
        "link_gb_s": shape["expert_bytes"] / copy_s / 1e9,
        "mmap_gb_s": shape["expert_bytes"] / mmap_s / 1e9,
        "bulk_gb_s": shape["expert_bytes"] / copy_s / 1e9,  # accelerate's loads: a plain read, as the store's
        "expert_s": statistics.median(times),
    }


def forecast(rows: list[dict], calib: dict, shape: dict, trace_path: str | None, resident_tps: float) -> None:
    """Add `forecast_tokens_per_s` to each row: the cost model with this machine's link and compute speed.

    Per layer the non-expert work is calibrated so that the resident model's time per token is matched exactly;
    moe-env rows replay the recorded trace through the same policy (moe_env.sim) over the link that moe-env's store
    reaches (a cold pread of one expert into a slot); accelerate loads its offloaded bytes synchronously at every
    forward (no overlap) at bulk-read speed; static placement pays one such read per non-pinned access.
    """
    from moe_env.allocation import build_allocation
    from moe_env.sim import simulate
    from moe_env.trace import load_trace, read_trace_file

    L, k, E = shape["layers"], shape["top_k"], shape["experts"]
    expert_bytes = shape["expert_bytes"]
    token_s = 1.0 / resident_tps
    overhead = max(token_s / L - k * calib["expert_s"], 1e-6)
    hardware = HardwareProfile(
        "this-box", calib["link_gb_s"], 0.0, expert_bytes / calib["expert_s"] / 1e9, overhead, "calibrated"
    )
    cost = CostModel(hardware, ExpertProfile("as-measured", expert_bytes, L, E, k, 0))
    trace = read_trace_file(trace_path) if trace_path else None
    for row in rows:
        if row.get("error") or row["config"] == "resident":
            row["forecast_tokens_per_s"] = resident_tps if row["config"] == "resident" else None
            continue
        if row["config"] == "accelerate":
            per_token = token_s + row["extra"]["offloaded_bytes"] / (calib["bulk_gb_s"] * 1e9)
            row["forecast_tokens_per_s"] = 1.0 / per_token
        elif row["config"] == "static" and trace is not None:
            pinned = row["extra"]["pinned"]
            misses = sum(
                int(e not in set(pinned[layer]))
                for seq in trace.sequences
                for step in seq.experts
                for layer, experts in enumerate(step)
                for e in experts.tolist()
                if e >= 0
            )
            steps = sum(seq.experts.shape[0] for seq in trace.sequences)
            row["forecast_tokens_per_s"] = 1.0 / (token_s + misses / steps * cost.copy_s)
        elif row["config"].startswith("moe-env:") and trace is not None:
            policy, prefetch, modes = moe_env_config(row["config"])
            try:
                layout = build_allocation(row["allocation"], row["total_slots"], L, E, k, load_trace)
                sim = simulate(trace, policy, layout, cost, prefetch, warm="warm" in modes,
                               prefill="bypass" if "bypass" in modes else "chunked")  # fmt: skip
                row["forecast_tokens_per_s"] = sim.tokens_per_s
                row["forecast_hit_rate"] = sim.hit_rate
            except Exception as exc:  # a learned policy that does not load: no forecast, say why
                row["forecast_tokens_per_s"] = None
                row["forecast_error"] = str(exc).splitlines()[0]
        else:
            row["forecast_tokens_per_s"] = None


# -- the orchestrator -----------------------------------------------------------------------------------------
def learned_available(spec_shape: dict) -> list[str]:
    from moe_env.policy import ModelSpec, build_policy

    found = []
    for name in LEARNED:
        try:
            policy = build_policy(name)
            policy.reset(
                ModelSpec(spec_shape["layers"], spec_shape["experts"], spec_shape["top_k"], spec_shape["expert_bytes"]),
                spec_shape["experts"],
            )
            found.append(name)
        except Exception as exc:
            print(f"skip --policy {name}: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
    return found


def main(argv: list[str] | None = None) -> int:
    return run_reporting_errors("peers.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.worker:
        try:
            out = worker(json.loads(args.worker))
        except Exception as exc:
            traceback.print_exc()
            out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(RESULT_TAG + json.dumps(out), flush=True)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: --device cuda but CUDA is not available on this machine")
        return 0
    wall = time.perf_counter()
    root = Path(args.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args, root)
    shape = peers.model_shape(prepared)
    L, E, k, eb = shape["layers"], shape["experts"], shape["top_k"], shape["expert_bytes"]
    expert_total = L * E * eb
    prompts, calibration = make_prompts(prepared, args.prompts, args.prompt_len)
    wanted = set(args.configs.split(",")) if args.configs else {"resident", "accelerate", "static", "moe-env"}
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "moe-env" in wanted and not args.quick:
        policies += learned_available(shape)
    if args.quick:
        policies = ["lru", "lru+lookahead"]

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(
        f"model: {args.model} ({peers.source_dir(prepared)}): {shape['model_type']}, {L} layers, hidden "
        f"{shape['hidden']}, {E} experts x intermediate {shape['expert_intermediate']}, top-{k}, vocab "
        f"{shape['vocab']}, {shape['dtype']}; expert {eb / 1e6:.2f} MB, all experts {expert_total / 2**30:.2f} GiB, "
        f"non-expert {peers.non_expert_bytes(prepared) / 2**20:.0f} MiB"
    )
    print(
        f"device {args.device}, {args.threads} thread(s); {len(prompts)} prompts x {len(prompts[0])} tokens, "
        f"{args.new_tokens} new tokens, median of {args.runs} runs; page cache: {args.page_cache}"
    )
    common = {"prepared": str(prepared), "prompts": prompts, "new_tokens": args.new_tokens, "runs": args.runs}
    rows: list[dict] = []

    def add(config: str, budget_label: str, budget: int, slots: int | None, **spec) -> dict:
        t = time.perf_counter()
        out = run_worker({**common, "mode": "measure", "config": config, "budget_bytes": budget, "slots": slots,
                          "calibration": calibration, **spec}, args)  # fmt: skip
        row = {"model": args.model, "config": config, "budget": budget_label, "budget_bytes": budget, "slots": slots,
               **{key: value for key, value in spec.items() if key != "trace"}, **out,
               "wall_s": time.perf_counter() - t}  # fmt: skip
        rows.append(row)
        status = row.get("error") or f"{row['tokens_per_s']:.2f} tok/s"
        print(f"  {config:<28} {budget_label:>8}  {status}  ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        return row

    resident = add("resident", "all", expert_total, None) if "resident" in wanted else None
    trace_path = None
    for label, total in parse_budgets(args.cache_budget, L, E, eb):
        budget, slots = total * eb, min(E, total // L)  # static placement and the skip rule: slots per layer
        if "accelerate" in wanted:
            add("accelerate", label, budget, None)
        if slots < k:
            print(f"  budget {label}: {slots} slots per layer < top-{k}: moe-env and static skipped", file=sys.stderr)
            continue
        if "static" in wanted:
            add("static", label, budget, slots)
        if "moe-env" in wanted:
            for policy in policies:
                trace = None
                if trace_path is None and args.device == "cpu":
                    trace = trace_path = str(Path(tempfile.mkdtemp(prefix="peers-trace-")) / "trace.moetrace")
                row = add(f"moe-env:{policy}", label, budget, slots, total_slots=total, trace=trace,
                          allocation=args.allocation)  # fmt: skip
                if trace and row.get("error"):
                    trace_path = None

    reference = resident["tokens"] if resident and not resident.get("error") else None
    for row in rows:
        if row.get("error"):
            continue
        row["same_tokens"] = None if reference is None else row["tokens"] == reference
        acc = next((r for r in rows if r["config"] == "accelerate" and r["budget"] == row["budget"]
                    and not r.get("error")), None)  # fmt: skip
        row["speedup_vs_accelerate"] = row["tokens_per_s"] / acc["tokens_per_s"] if acc else None
    if resident and not resident.get("error") and args.device == "cpu" and trace_path:
        calib = run_worker({"mode": "calibrate", "prepared": str(prepared)}, args)
        if not calib.get("error"):
            forecast(rows, calib, shape, trace_path, resident["tokens_per_s"])
            print(
                f"forecast: link {calib['link_gb_s']:.2f} GB/s (cold pread of one expert into a slot, as moe-env's "
                f"store does, {calib['copy_s'] * 1e3:.1f} ms; through a memory map {calib['mmap_gb_s']:.2f} GB/s), "
                f"one expert on one token {calib['expert_s'] * 1e3:.2f} ms"
            )
    print_table(rows, resident)
    if reference:
        print(f"tokens of the resident model (prompt 1): {reference[0]}")
    if args.json:
        keys = ("model", "config", "budget_bytes", "tokens_per_s", "ttft_s", "peak_bytes", "slow_tier_bytes",
                "same_tokens", "speedup_vs_accelerate")  # fmt: skip
        for row in rows:
            out = {key: row.get(key) for key in keys}
            extras = ("error", "forecast_tokens_per_s", "hit_rate", "slots", "total_slots", "allocation")
            out.update({key: row[key] for key in extras if key in row})
            print(json.dumps(out))
    print(f"({time.perf_counter() - wall:.0f} s)")
    bad = [r for r in rows if not r.get("error") and r.get("same_tokens") is False]
    if bad:
        print("TOKENS DIFFER: " + ", ".join(f"{r['config']}@{r['budget']}" for r in bad))
        return 1
    return 0


def print_table(rows: list[dict], resident: dict | None) -> None:
    print()
    head = (f"{'configuration':<28} {'budget':>7} {'slots':>5} {'tok/s':>7} {'vs acc':>7} {'forecast':>8} "
            f"{'ttft s':>7} {'peak MiB':>8} {'slow MiB/run':>12} {'hit':>5} {'same':>5}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("error"):
            print(f"{r['config']:<28} {r['budget']:>7}  ERROR {r['error'][:140]}")
            continue
        fc = r.get("forecast_tokens_per_s")
        vs = r.get("speedup_vs_accelerate")
        hit = r.get("hit_rate")
        print(
            f"{r['config']:<28} {r['budget']:>7} {r['slots'] or '-':>5} {r['tokens_per_s']:>7.2f} "
            f"{f'{vs:.2f}x' if vs else '-':>7} {f'{fc:.2f}' if fc else '-':>8} {r['ttft_s']:>7.3f} "
            f"{r['peak_bytes'] / 2**20:>8.0f} {r['slow_tier_bytes'] / 2**20:>12.0f} "
            f"{f'{hit:.2f}' if hit is not None else '-':>5} {r.get('same_tokens', '-')!s:>5}"
        )
    accs = [r for r in rows if r["config"] == "accelerate" and not r.get("error")]
    for acc in accs:
        dm = acc["extra"].get("device_map", {}).get("modules", {})
        off = acc["extra"]["offloaded_bytes"] / 2**20
        print(f"accelerate @ {acc['budget']}: device_map modules {dm}, offloaded {off:.0f} MiB (loaded every forward)")


if __name__ == "__main__":
    raise SystemExit(main())
