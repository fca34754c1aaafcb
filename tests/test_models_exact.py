"""Offloading never changes the model's output: tokens and logits equal the unmodified model's, for every family.

Compared bitwise against the eager experts implementation (the loop the runtime reproduces), within 1e-5 against
the default implementation transformers picks, for budgets from top-k to all experts, with and without lookahead
prefetch, under LRU and LFU, and on a paced link (exactness must not depend on copy timing).
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT_IDS

from moe_env.engine import EngineConfig, OffloadEngine, greedy_decode
from moe_env.errors import ModelError
from moe_env.models import adapter_for
from moe_env.models.tiny import FAMILIES, tiny_config

NEW_TOKENS = 8
CPU = torch.device("cpu")
_reference_cache: dict[str, tuple[list[int], list[torch.Tensor]]] = {}


def reference(tiny_models, family: str) -> tuple[list[int], list[torch.Tensor]]:
    if family not in _reference_cache:
        tokens, logits, _, _ = greedy_decode(tiny_models(family), PROMPT_IDS, NEW_TOKENS, CPU, keep_logits=True)
        _reference_cache[family] = (tokens, logits)
    return _reference_cache[family]


def budgets(family: str) -> list[int]:
    config = tiny_config(family)
    top_k = config.num_experts_per_tok
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    num_experts = num_experts or config.n_routed_experts
    return sorted({top_k, (top_k + num_experts) // 2, num_experts})


CASES = [
    (family, slots, policy, prefetch)
    for family in FAMILIES
    for slots in budgets(family)
    for policy in ("lru", "lfu")
    for prefetch in (None, "lookahead")
]


@pytest.mark.parametrize(("family", "slots", "policy", "prefetch"), CASES)
def test_offloaded_output_is_bitwise_identical(tiny_models, family, slots, policy, prefetch):
    tokens, logits = reference(tiny_models, family)
    config = EngineConfig(cache_slots=slots, policy=policy, prefetch=prefetch)
    with OffloadEngine.from_model(tiny_models(family), config) as engine:
        result = engine.generate(PROMPT_IDS, NEW_TOKENS, keep_logits=True)
    assert result.tokens == tokens
    for expected, got in zip(logits, result.logits, strict=True):
        assert torch.equal(expected, got)
    assert result.metrics.hits + result.metrics.misses == (NEW_TOKENS - 1) * engine.spec.num_layers * engine.spec.top_k


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_on_a_paced_link_with_the_smallest_cache(tiny_models, family):
    tokens, logits = reference(tiny_models, family)
    top_k = tiny_config(family).num_experts_per_tok
    config = EngineConfig(cache_slots=top_k, policy="lru", prefetch="lookahead", link="nvme")
    with OffloadEngine.from_model(tiny_models(family), config) as engine:
        result = engine.generate(PROMPT_IDS, NEW_TOKENS, keep_logits=True)
    assert result.tokens == tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, result.logits, strict=True))
    assert result.metrics.copy_s > 0  # the paced copies did happen


@pytest.mark.parametrize("family", FAMILIES)
def test_close_to_the_default_experts_implementation(tiny_models, family):
    """transformers' default (grouped_mm) multiplies in another order: equal within 1e-5."""
    model = tiny_models(family)
    model.set_experts_implementation("grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"
    default_tokens, default_logits, _, _ = greedy_decode(model, PROMPT_IDS, NEW_TOKENS, CPU, keep_logits=True)
    tokens, logits = reference(tiny_models, family)
    assert default_tokens == tokens
    for a, b in zip(default_logits, logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_lookahead_logits_equal_the_next_routers_logits(tiny_models):
    """The speculative signal is the next router applied to this layer's input: exact when inputs coincide."""
    model = tiny_models("deepseek_v3")
    adapter = adapter_for(model)
    hidden = torch.randn(3, adapter.shape.hidden)
    router = adapter.layers[1].router
    expected, _, _ = router(hidden)
    assert torch.equal(adapter.raw_logits(router, hidden), expected)


def test_non_moe_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(ModelError, match="not a supported MoE family"):
        adapter_for(LlamaForCausalLM(config))


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-olmoe"])
def test_embedded_model_is_exact_through_the_default_loader(name, tmp_path):
    from moe_env.embedded import embedded_model_dir
    from moe_env.engine import load_model

    if not (embedded_model_dir(name) / "config.json").exists():
        pytest.skip(f"embedded model {name} not built in this checkout")
    reference, tokenizer, _ = load_model(name, None)
    prompt = tokenizer("def fibonacci(n):", add_special_tokens=False)["input_ids"]
    tokens, logits, _, _ = greedy_decode(reference, prompt, NEW_TOKENS, CPU, keep_logits=True)
    top_k = adapter_for(reference).top_k
    config = EngineConfig(model=name, cache_slots=top_k, prefetch="lookahead", store_dir=str(tmp_path))
    with OffloadEngine(config) as engine:
        result = engine.generate("def fibonacci(n):", NEW_TOKENS, keep_logits=True)
    assert result.tokens == tokens and result.text == tokenizer.decode(tokens)
    assert all(torch.equal(a, b) for a, b in zip(logits, result.logits, strict=True))


SECOND_PROMPT = list(reversed(PROMPT_IDS))


@pytest.fixture(scope="module")
def profile_traces(tmp_path_factory):
    """A training trace of each family's shape (random routing: the profile only needs per-layer hit curves)."""
    import numpy as np

    from moe_env.trace import SequenceTrace, Trace, TraceMeta, save_trace

    def make(family: str, spec) -> str:
        rng = np.random.default_rng(0)
        rows = [[rng.choice(spec.num_experts, spec.top_k, replace=False) for _ in range(spec.num_layers)]
                for _ in range(30)]  # fmt: skip
        meta = TraceMeta(family, spec.num_layers, spec.num_experts, spec.top_k, "test")
        path = tmp_path_factory.mktemp(family) / "train.npz"
        return str(save_trace(Trace(meta, [SequenceTrace(np.asarray(rows, dtype=np.int16))]), path))

    return make


@pytest.mark.parametrize("prefill", ["chunked", "bypass"])
@pytest.mark.parametrize("allocation", ["uniform", "shared", "profile"])
def test_exact_for_every_allocation_and_prefill_mode_cold_then_warm(
    tiny_models, family, allocation, prefill, profile_traces
):
    """Two requests through one warm engine: the first starts cold (empty cache), the second warm."""
    expected = [reference(tiny_models, family)]
    tokens, logits, _, _ = greedy_decode(tiny_models(family), SECOND_PROMPT, NEW_TOKENS, CPU, keep_logits=True)
    expected.append((tokens, logits))
    model = tiny_models(family)
    adapter = adapter_for(model)
    num_layers, top_k = len(adapter.layers), adapter.top_k
    budget = str(num_layers * top_k)  # total slots: the least possible, so prefills evict or bypass
    if allocation == "profile":
        from moe_env.policy import ModelSpec

        spec = ModelSpec(num_layers, adapter.num_experts, top_k)
        allocation = f"profile:{profile_traces(family, spec)}"
    config = EngineConfig(cache_budget=budget, allocation=allocation, prefill=prefill, warm=True, prefetch="lookahead")
    with OffloadEngine.from_model(model, config) as engine:
        results = engine.generate_many([PROMPT_IDS, SECOND_PROMPT], NEW_TOKENS, keep_logits=True)
        assert engine.cache_state.allocation.total_slots <= int(budget)
    for (tokens, logits), result in zip(expected, results, strict=True):
        assert result.tokens == tokens
        assert all(torch.equal(a, b) for a, b in zip(logits, result.logits, strict=True))
    first = results[0].metrics
    if prefill == "bypass" and first.prefill_hits + first.prefill_misses > int(budget):
        assert first.bypass_loads > 0  # some layer's prompt experts exceed its share (top-k slots): bypassed
    assert results[1].metrics.hits > 0
