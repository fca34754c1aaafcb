"""OffloadEngine: a Hugging Face MoE model whose experts live in a host tier and reach the device through a cache.

    engine = OffloadEngine(EngineConfig(model="tiny-mixtral", cache_slots=4, policy="lru", prefetch="lookahead"))
    result = engine.generate("def fib(n):", max_new_tokens=32)   # tokens, text, metrics

    # a serving cache: 6 GiB of experts in one pool across layers, warm across requests, prefill bypass
    config = EngineConfig(model=..., cache_budget="6GiB", allocation="shared", warm=True, prefill="bypass")
    results = OffloadEngine(config).generate_many(["prompt one", "prompt two"], max_new_tokens=32)

Observers: ``engine.add_observer(fn)`` calls ``fn(routing: LayerRouting)`` for every MoE layer of every forward
(prefill: step -1 with all prompt tokens; decode: step 0, 1, ...), before the layer's experts are acquired.
``on_sequence_start(fn)`` / ``on_sequence_end(fn)`` call ``fn(prompt_ids)`` / ``fn(result)`` around each
generate. The engine patches the model it is given in place (``OffloadEngine.from_model``).
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.utils import logging as hf_logging

from moe_env import embedded
from moe_env.allocation import ALLOCATIONS, Allocation, build_allocation, parse_budget
from moe_env.cache import PREFILL_MODES, Counters, ExpertCacheState
from moe_env.checkpoint import CheckpointExperts, CheckpointLayoutError, load_skeleton
from moe_env.device_cache import SlotPools
from moe_env.errors import ModelError, UsageError
from moe_env.metrics import RunMetrics
from moe_env.models import ModelAdapter, adapter_for
from moe_env.offload import OffloadRuntime, RoutingObserver
from moe_env.policy import ModelSpec, Policy, build_policy, check_policy_spec
from moe_env.store import DiskExpertStore, HostExpertStore, Packer, PinnedExpertStore
from moe_env.store_cache import open_entry
from moe_env.trace import load_trace
from moe_env.transfer import link_by_name, make_copy_engine

DEFAULT_MODEL = embedded.DEFAULT_MODEL  # re-exported: the CLI and benches import it from here
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL  # an embedded model name or a local Hugging Face model directory
    cache_slots: int | str = "all"  # device slots per MoE layer, top_k..num_experts, or "all"
    policy: str | Policy = "lru"
    prefetch: str | Policy | None = None
    link: str = "host"  # CPU only: pace copies to this link profile (moe_env.transfer.LINKS)
    device: str = "cpu"
    dtype: str | None = None  # None: as stored
    store_dir: str | None = None  # where the CPU expert store is written; default: moe_env.store_cache
    keep_experts: bool = True  # False: forget every expert after its layer ran (the "no cache" baseline)
    cache_budget: str | None = None  # moe_env.allocation.parse_budget: "6GiB", "0.25", "96" (total slots)
    allocation: str = "uniform"  # uniform, shared or profile:TRACE (moe_env.allocation.build_allocation)
    prefill: str = "chunked"  # chunked (through the cache) or bypass (moe_env.cache.PREFILL_MODES)
    warm: bool = False  # keep the cache between generate() calls (a serving process) instead of emptying it


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str | None
    metrics: RunMetrics
    logits: list[torch.Tensor] = field(default_factory=list)  # per generated token, float32 on CPU (keep_logits)


def greedy_decode(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    device: torch.device,
    before_forward: Callable[[int], None] = lambda step: None,
    keep_logits: bool = False,
    eos_token_id: int | None = None,
) -> tuple[list[int], list[torch.Tensor], float, float]:
    """Greedy decoding with a KV cache: (new tokens, logits per token, ttft_s, decode_s).

    `before_forward(step)` runs before each forward: step -1 is the prefill, step t the forward that consumes
    generated token t. The same loop drives the unmodified model in tests, so only the experts differ.
    """
    tokens: list[int] = []
    kept: list[torch.Tensor] = []
    cache = DynamicCache(config=model.config)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    start = time.perf_counter()
    ttft = 0.0
    with torch.inference_mode():
        for step in range(-1, max_new_tokens - 1):
            before_forward(step)
            out = model(input_ids=input_ids, cache=cache, use_cache=True)
            logits = out.logits[0, -1]
            token = int(torch.argmax(logits))  # a device sync: every token is known on the host
            tokens.append(token)
            if keep_logits:
                kept.append(logits.float().cpu())
            if step == -1:
                ttft = time.perf_counter() - start
            if eos_token_id is not None and token == eos_token_id:
                break
            input_ids = torch.tensor([[token]], dtype=torch.long, device=device)
    return tokens, kept, ttft, time.perf_counter() - start - ttft


class OffloadEngine:
    def __init__(self, config: EngineConfig):
        # Bad specs (names, roles, argument values) are reported before the (slow) model load.
        link_by_name(config.link)
        check_policy_spec(config.policy)
        check_policy_spec(config.prefetch, role="prefetch")
        check_cache_options(config)
        policy = build_policy(config.policy, config.prefetch)
        model, tokenizer, source_dir, experts = load_offloadable(config.model, config.dtype)
        try:
            self._init(model, tokenizer, config, source_dir, experts, policy)
        finally:
            if experts is not None:
                experts.close()

    @classmethod
    def from_model(cls, model: PreTrainedModel, config: EngineConfig, tokenizer=None) -> OffloadEngine:
        """Offload an in-memory model (patched in place; its expert weights are dropped)."""
        engine = cls.__new__(cls)
        engine._init(model, tokenizer, config, None)
        return engine

    def _init(
        self,
        model: PreTrainedModel,
        tokenizer,
        config: EngineConfig,
        source_dir: Path | None,
        experts: CheckpointExperts | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.device = _device(config.device)
        link = link_by_name(config.link)
        adapter = adapter_for(model)
        policy = policy or build_policy(config.policy, config.prefetch)
        if policy.needs_future:
            raise UsageError(f"policy {policy.name!r} reads the future and needs a trace: use moe-env bench")
        self.spec = ModelSpec(
            num_layers=len(adapter.layers),
            num_experts=adapter.num_experts,
            top_k=adapter.top_k,
            expert_bytes=adapter.shape.nbytes,
            name=str(getattr(model.config, "name_or_path", "") or config.model),
        )
        allocation = resolve_allocation(config, self.spec)
        cache_state = ExpertCacheState(self.spec, allocation, policy, prefill=config.prefill)
        scratch = BYPASS_SCRATCH_SLOTS if config.prefill == "bypass" else 0  # device memory beyond the budget
        # experts from the checkpoint's files (the model holds none), else packed from the in-memory model
        store = self._build_store(adapter, source_dir, None if experts is None else experts.pack)
        self.runtime = OffloadRuntime(
            adapter,
            store,
            SlotPools(adapter.shape, len(adapter.layers), allocation, self.device, scratch),
            cache_state,
            make_copy_engine(self.device, link),
            keep_experts=config.keep_experts,
        )
        self.runtime.install()
        self.model = model.to(self.device).eval()
        self._starts: list[Callable[[list[int]], None]] = []
        self._ends: list[Callable[[GenerationResult], None]] = []

    def _build_store(self, adapter: ModelAdapter, source_dir: Path | None, pack: Packer | None) -> HostExpertStore:
        if self.device.type == "cuda":
            return PinnedExpertStore(adapter, pack)
        if self.config.store_dir is not None:
            directory = Path(self.config.store_dir)
        elif source_dir is not None:  # a bounded cache shared across runs (moe_env.store_cache)
            self._store_entry = open_entry(_store_key(source_dir, adapter), source_dir)
            try:
                return DiskExpertStore.write(adapter, self._store_entry.store_path, pack)
            except BaseException:
                self._store_entry.close()
                raise
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="moe-env-store-")
            directory = Path(self._tmp.name)
        return DiskExpertStore.write(adapter, directory / "experts.safetensors", pack)

    # -- public API ----------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.runtime.cache_state.capacity

    @property
    def cache_state(self) -> ExpertCacheState:
        return self.runtime.cache_state

    def add_observer(self, observer: RoutingObserver) -> None:
        self.runtime.observers.append(observer)

    def on_sequence_start(self, hook: Callable[[list[int]], None]) -> None:
        self._starts.append(hook)

    def on_sequence_end(self, hook: Callable[[GenerationResult], None]) -> None:
        self._ends.append(hook)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
        elif self.tokenizer is None:
            raise UsageError("this model has no tokenizer: pass prompt token ids instead of text")
        else:
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            raise UsageError("empty prompt: give at least one token")
        vocab = int(self.model.config.vocab_size)
        if not all(0 <= t < vocab for t in ids):
            raise UsageError(f"prompt token ids must lie in 0..{vocab - 1}")
        return ids

    @property
    def max_positions(self) -> int | None:
        """Positions the model was built for (config.max_position_embeddings); None when it declares none."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def check_context(self, prompt_ids: Sequence[int], max_new_tokens: int, where: str = "the prompt") -> None:
        """UsageError if the prompt plus `max_new_tokens` exceed the model's positions (it would decode garbage)."""
        limit = self.max_positions
        if limit is not None and len(prompt_ids) + max_new_tokens > limit:
            room = max(limit - len(prompt_ids), 0)
            raise UsageError(
                f"{where} ({len(prompt_ids)} tokens) + max new tokens ({max_new_tokens}) exceed the model's "
                f"{limit} positions; shorten the prompt or lower the max new tokens to {room}"
            )

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        keep_logits: bool = False,
        stop_at_eos: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Greedy-decode `max_new_tokens` tokens; `on_step(step)` runs before each forward (progress bars)."""
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_ids = self.encode(prompt)
        self.check_context(prompt_ids, max_new_tokens)
        for hook in self._starts:
            hook(prompt_ids)
        runtime = self.runtime
        runtime.begin_sequence(warm=self.config.warm)
        runtime.cache_state.counters = Counters()  # per-generate metrics
        runtime.copier.reset_stats()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        def set_step(step: int) -> None:
            runtime.step = step
            if on_step is not None:
                on_step(step)

        eos = self.tokenizer.eos_token_id if (stop_at_eos and self.tokenizer is not None) else None
        tokens, logits, ttft, decode_s = greedy_decode(
            self.model, prompt_ids, max_new_tokens, self.device, set_step, keep_logits, eos
        )
        runtime.cache_state.finish()
        decode_tokens = len(tokens) - 1
        metrics = RunMetrics.from_counters(
            runtime.cache_state.counters,
            stall_s=runtime.copier.stall_s(),
            copy_s=runtime.copier.copy_s(),
            ttft_s=ttft,
            decode_s=decode_s,
            tokens_per_s=decode_tokens / decode_s if decode_s > 0 else 0.0,
            new_tokens=len(tokens),
            peak_cache_bytes=(
                torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else runtime.pools.nbytes
            ),
        )
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        result = GenerationResult(tokens=tokens, text=text, metrics=metrics, logits=logits)
        for hook in self._ends:
            hook(result)
        return result

    def generate_many(
        self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int, **options
    ) -> list[GenerationResult]:
        """One generate per prompt, in order, through this engine's cache (kept between them when warm)."""
        return [self.generate(prompt, max_new_tokens, **options) for prompt in prompts]

    def close(self) -> None:
        self.runtime.close()
        entry = getattr(self, "_store_entry", None)
        if entry is not None:
            entry.close()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()

    def __enter__(self) -> OffloadEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- loading ---------------------------------------------------------------------------------------------------
BYPASS_SCRATCH_SLOTS = 2  # device buffers for prefill experts that bypass the cache (double-buffered copies)


def check_cache_options(config: EngineConfig) -> None:
    """Fail fast (before the model load) on a bad budget, allocation or prefill mode."""
    if config.cache_budget is not None:
        parse_budget(config.cache_budget)
    kind = config.allocation.strip().partition(":")[0]
    if kind not in ALLOCATIONS:
        raise UsageError(f"unknown cache allocation {config.allocation!r}; use uniform, shared or profile:TRACE")
    if config.prefill not in PREFILL_MODES:
        raise UsageError(f"unknown prefill mode {config.prefill!r}; use one of {', '.join(PREFILL_MODES)}")


def resolve_allocation(config: EngineConfig, spec: ModelSpec) -> Allocation:
    """The cache layout: `cache_budget` (bytes, fraction, total slots) or `cache_slots` per layer (x layers) as the
    total, laid out by `allocation`."""
    if config.cache_budget is not None:
        total = parse_budget(config.cache_budget).total_slots(spec.num_layers, spec.num_experts, spec.expert_bytes)
    else:
        total = _slots(config.cache_slots, spec.top_k, spec.num_experts) * spec.num_layers
    if config.allocation.strip() == "uniform" and config.cache_budget is None:
        return Allocation.uniform(spec.num_layers, spec.num_experts, total // spec.num_layers)
    return build_allocation(config.allocation, total, spec.num_layers, spec.num_experts, spec.top_k, load_trace)


def parse_slots(value: int | str, adapter: ModelAdapter) -> int:
    """Slots per layer: "all" or an int in top_k..num_experts (a layer's routed experts must fit at once)."""
    return _slots(value, adapter.top_k, adapter.num_experts)


def _slots(value: int | str, top_k: int, num_experts: int) -> int:
    if isinstance(value, str) and value.strip().lower() == "all":
        return num_experts
    try:
        slots = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"cache slots must be an integer or 'all', got {value!r}") from None
    if not top_k <= slots <= num_experts:
        raise UsageError(
            f"cache slots {slots} outside {top_k}..{num_experts}: at least top-k={top_k} "
            f"(one token's experts) and at most the {num_experts} experts of a layer"
        )
    return slots


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use cpu or cuda")
    return device


def resolve_model_dir(name: str) -> Path:
    """A local model directory, or an embedded model's directory."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name in embedded.EMBEDDED_MODELS:
        directory = Path(embedded.embedded_model_dir(name))
        if not (directory / "config.json").exists():
            raise ModelError(f"embedded model {name!r} is not built: run train/pretrain.py (see README)")
        return directory
    known = ", ".join(sorted(embedded.EMBEDDED_MODELS))
    raise UsageError(f"model {name!r} is neither a local model directory nor an embedded model ({known})")


def _checked_model_dir(name: str, dtype: str | None) -> tuple[Path, torch.dtype | None]:
    """The model directory of `name` (a supported MoE family) and the requested dtype (None: as stored)."""
    directory = resolve_model_dir(name)
    if not (directory / "config.json").exists():
        raise ModelError(f"{directory} has no config.json: not a Hugging Face model directory")
    torch_dtype = None
    if dtype is not None:
        if dtype not in _DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
        torch_dtype = _DTYPES[dtype]
    try:
        config_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{directory}/config.json is unreadable: {exc}") from None
    from moe_env.models import supported_model_types

    if config_type not in supported_model_types():
        raise ModelError(
            f"model type {config_type!r} is not a supported MoE family; supported: {', '.join(supported_model_types())}"
        )
    return directory, torch_dtype


def _load_tokenizer(directory: Path):
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return None


# what reading a damaged model directory raises: I/O errors, bad JSON, a truncated safetensors header or body
_UNREADABLE = (OSError, ValueError, struct.error, SafetensorError)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_model(name: str, dtype: str | None) -> tuple[PreTrainedModel, object | None, Path]:
    """The whole model, experts included (the unmodified reference; OffloadEngine uses load_offloadable)."""
    directory, torch_dtype = _checked_model_dir(name, dtype)
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a loading bar per run is noise around our own progress and errors
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype or "auto", experts_implementation="eager"
        )
    except _UNREADABLE as exc:
        raise ModelError(f"cannot load model from {directory}: {_first_line(exc)}") from None
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    return model.eval(), _load_tokenizer(directory), directory


def load_offloadable(
    name: str, dtype: str | None
) -> tuple[PreTrainedModel, object | None, Path, CheckpointExperts | None]:
    """The model without its experts (on meta) and a reader of its experts from the checkpoint, one at a time.

    The process never holds every expert: the store is built (or found) by streaming them. A checkpoint that cannot
    be streamed (no safetensors, or an unknown expert layout) is loaded whole, with a warning, and its experts are
    packed from memory (reader None), as before.
    """
    directory, torch_dtype = _checked_model_dir(name, dtype)
    try:
        model = load_skeleton(directory, torch_dtype)
        experts = CheckpointExperts(directory, adapter_for(model))
    except CheckpointLayoutError as exc:
        warnings.warn(f"{exc}; loading the whole model to pack its experts", stacklevel=2)
        model, tokenizer, directory = load_model(name, dtype)
        return model, tokenizer, directory, None
    except _UNREADABLE as exc:  # unreadable or truncated files: the same one-line error as load_model's
        raise ModelError(f"cannot load model from {directory}: {_first_line(exc)}; re-download or re-save it") from None
    return model, _load_tokenizer(directory), directory, experts


def _store_key(source_dir: Path, adapter: ModelAdapter) -> str:
    """Identifies the packed store of a model directory: its weight files (name, size, mtime) and the dtype."""
    digest = hashlib.sha256(str(source_dir.resolve()).encode())
    for weights in sorted(source_dir.glob("*.safetensors")) + sorted(source_dir.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(str(adapter.shape).encode())
    return digest.hexdigest()[:16]
