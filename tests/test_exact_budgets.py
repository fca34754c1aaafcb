"""Exactness under budgets, allocations and prefill modes where tests/test_models_exact.py does not reach: requests
served cold one after another (each empties the cache first) in every family, and the trained embedded models
(skewed real routing, not random) cold then warm. Tokens and logits bitwise equal to the unmodified model."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT_IDS

from moe_env.engine import EngineConfig, OffloadEngine, greedy_decode
from moe_env.models import adapter_for
from moe_env.models.tiny import FAMILIES

NEW_TOKENS = 6
CPU = torch.device("cpu")
PROMPTS = [PROMPT_IDS, list(reversed(PROMPT_IDS))]
ALLOCATIONS = ["uniform", "shared", "profile"]


def _references(model, prompts) -> list[tuple[list[int], list[torch.Tensor]]]:
    return [greedy_decode(model, prompt, NEW_TOKENS, CPU, keep_logits=True)[:2] for prompt in prompts]


def _assert_exact(expected, results) -> None:
    for (tokens, logits), result in zip(expected, results, strict=True):
        assert result.tokens == tokens
        assert all(torch.equal(a, b) for a, b in zip(logits, result.logits, strict=True))


@pytest.fixture(scope="module")
def random_profile(tmp_path_factory):
    import numpy as np

    from moe_env.trace import SequenceTrace, Trace, TraceMeta, save_trace

    def make(layers: int, experts: int, top_k: int) -> str:
        rng = np.random.default_rng(0)
        rows = [[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(20)]
        meta = TraceMeta("tiny", layers, experts, top_k, "test")
        path = tmp_path_factory.mktemp("profile") / f"{layers}x{experts}x{top_k}.npz"
        return str(save_trace(Trace(meta, [SequenceTrace(np.asarray(rows, dtype=np.int16))]), path))

    return make


@pytest.mark.parametrize("prefill", ["chunked", "bypass"])
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cold_requests_one_after_another_are_exact(tiny_models, random_profile, family, allocation, prefill):
    model = tiny_models(family)
    expected = _references(model, PROMPTS)
    adapter = adapter_for(model)
    layers, top_k = len(adapter.layers), adapter.top_k
    if allocation == "profile":
        allocation = f"profile:{random_profile(layers, adapter.num_experts, top_k)}"
    config = EngineConfig(cache_budget=str(layers * top_k), allocation=allocation, prefill=prefill, warm=False,
                          prefetch="lookahead")  # fmt: skip
    with OffloadEngine.from_model(model, config) as engine:
        results = engine.generate_many(PROMPTS, NEW_TOKENS, keep_logits=True)
    _assert_exact(expected, results)
    second = results[1].metrics
    assert second.prefill_hits == 0  # cold: the second request found nothing of the first one's resident


@pytest.mark.parametrize("prefill", ["chunked", "bypass"])
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-olmoe"])
def test_embedded_models_are_exact_under_every_layout_cold_then_warm(name, allocation, prefill, tmp_path):
    from moe_env.embedded import embedded_model_dir
    from moe_env.engine import load_model

    if not (embedded_model_dir(name) / "config.json").exists():
        pytest.skip(f"embedded model {name} not built in this checkout")
    reference, tokenizer, _ = load_model(name, None)
    texts = ["def fibonacci(n):", "import os\nfor name in"]
    expected = _references(reference, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
    if allocation == "profile":
        allocation = f"profile:builtin:{name}/train"  # fitted on the model's own training-split routing
    config = EngineConfig(model=name, cache_budget="0.375", allocation=allocation, prefill=prefill, warm=True,
                          prefetch="lookahead", store_dir=str(tmp_path))  # fmt: skip
    with OffloadEngine(config) as engine:
        results = engine.generate_many(texts, NEW_TOKENS, keep_logits=True)
        assert engine.cache_state.allocation.total_slots <= 0.375 * engine.spec.num_layers * engine.spec.num_experts
    _assert_exact(expected, results)
    assert results[1].metrics.prefill_hits > 0  # warm: the second prompt found experts the first left resident
