"""The engine drives ExpertCacheState exactly as a replay of its routings does, and keeps the cache's invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPT_IDS

from moe_env.cache import ExpertCacheState
from moe_env.engine import EngineConfig, OffloadEngine, greedy_decode, parse_slots
from moe_env.errors import ModelError, UsageError
from moe_env.models import adapter_for
from moe_env.policy import Policy, PolicyError, build_policy
from moe_env.routing import LayerRouting, route_events
from moe_env.store import DiskExpertStore

NEW_TOKENS = 8


def run_recorded(model, config: EngineConfig) -> tuple[OffloadEngine, list[LayerRouting], object]:
    engine = OffloadEngine.from_model(model, config)
    routings: list[LayerRouting] = []
    engine.add_observer(routings.append)
    result = engine.generate(PROMPT_IDS, NEW_TOKENS, keep_logits=True)
    return engine, routings, result


@pytest.mark.parametrize(("policy", "prefetch"), [("lru", None), ("lfu", "lookahead"), ("lru", "lookahead")])
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3"])
def test_engine_counters_equal_a_replay_of_its_routings(tiny_models, family, policy, prefetch):
    model = tiny_models(family)
    top_k = adapter_for(model).top_k
    engine, routings, result = run_recorded(
        model, EngineConfig(cache_slots=top_k + 1, policy=policy, prefetch=prefetch)
    )
    engine.close()
    assert [r.step for r in routings][: engine.spec.num_layers] == [-1] * engine.spec.num_layers
    assert {r.step for r in routings} == set(range(-1, NEW_TOKENS - 1))
    replay = ExpertCacheState(engine.spec, top_k + 1, build_policy(policy, prefetch))
    for routing in routings:
        for event in route_events(routing, replay.capacity):
            replay.route(event)
    replay.finish()
    assert replay.counters.as_dict() == engine.cache_state.counters.as_dict()
    assert result.metrics.hits == replay.counters.hits and result.metrics.misses == replay.counters.misses


def test_routings_carry_the_router_signals(tiny_models):
    engine, routings, _ = run_recorded(tiny_models("mixtral"), EngineConfig(cache_slots=2, prefetch="lookahead"))
    engine.close()
    num_layers, num_experts = engine.spec.num_layers, engine.spec.num_experts
    prefill = routings[0]
    assert prefill.prefill and prefill.experts.shape == (len(PROMPT_IDS), 2)
    assert prefill.gate_logits.shape == (len(PROMPT_IDS), num_experts)
    for routing in routings:
        # the router picked the top-k of its own logits (Mixtral: softmax is monotone)
        top = np.argsort(-routing.gate_logits, axis=-1, kind="stable")[:, :2]
        assert np.array_equal(np.sort(top, axis=-1), np.sort(routing.experts, axis=-1))
        assert (routing.lookahead_logits is None) == (routing.layer == num_layers - 1)
    # the lookahead of layer l at step t is computed on layer l's input; layer l+1's gate sees a different input
    decode = [r for r in routings if r.step == 0]
    assert not np.array_equal(decode[0].lookahead_logits, decode[1].gate_logits)


class _Buggy(Policy):
    def __init__(self, fault: str):
        self.fault = fault
        self.name = f"buggy-{fault}"

    def eviction_scores(self, layer, candidates, cache):
        if self.fault == "nan":
            return np.full(len(candidates), np.nan)
        if self.fault == "length":
            return np.zeros(len(candidates) + 1)
        return super().eviction_scores(layer, candidates, cache)

    def prefetch(self, event, cache):
        return [(event.layer + 1, 10_000)] if self.fault == "prefetch" else ()


@pytest.mark.parametrize("fault", ["nan", "length", "prefetch"])
def test_a_buggy_policy_gets_a_policy_error(tiny_models, fault):
    engine = OffloadEngine.from_model(tiny_models("mixtral"), EngineConfig(cache_slots=3, policy=_Buggy(fault)))
    with pytest.raises(PolicyError, match=f"buggy-{fault}"):
        engine.generate(PROMPT_IDS, NEW_TOKENS)
    engine.close()


class _Chaotic(Policy):
    """Random eviction scores and random prefetches of any layer: stresses slot reuse and in-flight copies."""

    name = "chaotic"

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def eviction_scores(self, layer, candidates, cache):
        return self.rng.random(len(candidates))

    def prefetch(self, event, cache):
        count = int(self.rng.integers(0, 2 * self.spec.top_k + 1))
        layers = self.rng.integers(0, self.spec.num_layers, count)
        experts = self.rng.integers(0, self.spec.num_experts, count)
        return list(zip(layers.tolist(), experts.tolist(), strict=True))


@pytest.mark.parametrize("link", ["host", "nvme"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_hold_under_a_chaotic_policy(tiny_models, seed, link):
    model = tiny_models("olmoe")
    tokens, logits, _, _ = greedy_decode(
        tiny_models("olmoe"), PROMPT_IDS, NEW_TOKENS, torch.device("cpu"), keep_logits=True
    )
    capacity = 4 + seed  # olmoe: top-4 of 16
    engine = OffloadEngine.from_model(model, EngineConfig(cache_slots=capacity, policy=_Chaotic(seed), link=link))
    checks: list[None] = []

    def check_layer(routing: LayerRouting) -> None:
        state = engine.cache_state
        for layer in range(engine.spec.num_layers):
            resident = state.resident(layer)
            assert len(resident) <= capacity and len(set(resident)) == len(resident)
            for expert in resident:
                assert state.slot_of(layer, expert) >= 0
        checks.append(None)

    engine.add_observer(check_layer)
    result = engine.generate(PROMPT_IDS, NEW_TOKENS, keep_logits=True)
    assert result.tokens == tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, result.logits, strict=True))
    assert result.metrics.prefetch_issued > 0 and checks
    # every slot physically holds the expert the bookkeeping says it holds
    engine.runtime.copier.drain()
    for layer in range(engine.spec.num_layers):
        for expert in engine.cache_state.resident(layer):
            slot = engine.cache_state.slot_of(layer, expert)
            assert torch.equal(engine.runtime.pools.buffer(layer, slot), engine.runtime.store.source(layer, expert))
    engine.close()


def test_policies_that_read_the_future_are_refused(tiny_models):
    class Oracle(Policy):
        needs_future = True
        name = "oracle-like"

    with pytest.raises(UsageError, match="needs a trace"):
        OffloadEngine.from_model(tiny_models("mixtral"), EngineConfig(cache_slots=2, policy=Oracle()))


@pytest.mark.parametrize(("slots", "ok"), [("all", 8), (2, 2), ("8", 8), (1, None), (9, None), ("many", None)])
def test_cache_slots_are_validated(tiny_models, slots, ok):
    adapter = adapter_for(tiny_models("mixtral"))
    if ok is None:
        with pytest.raises(UsageError):
            parse_slots(slots, adapter)
    else:
        assert parse_slots(slots, adapter) == ok


def test_text_prompt_without_tokenizer_is_a_usage_error(tiny_models):
    with OffloadEngine.from_model(tiny_models("mixtral"), EngineConfig(cache_slots=2)) as engine:
        with pytest.raises(UsageError, match="no tokenizer"):
            engine.generate("hello", 2)
        with pytest.raises(UsageError, match=r"0\.\.127"):
            engine.generate([1, 500], 2)


def test_sequence_hooks_and_per_generate_metrics(tiny_models):
    with OffloadEngine.from_model(tiny_models("qwen2_moe"), EngineConfig(cache_slots=2)) as engine:
        seen: list[object] = []
        engine.on_sequence_start(seen.append)
        engine.on_sequence_end(seen.append)
        first = engine.generate(PROMPT_IDS, 4)
        second = engine.generate(PROMPT_IDS, 4)
    assert seen[0] == PROMPT_IDS and seen[1] is first and seen[3] is second
    assert first.tokens == second.tokens
    assert first.metrics.hits == second.metrics.hits  # the cache starts empty for every sequence
    assert first.metrics.peak_cache_bytes == engine.spec.num_layers * 2 * engine.spec.expert_bytes


def test_the_fused_expert_weights_are_dropped(tiny_models):
    model = tiny_models("deepseek_v2")
    experts_numel = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    before = sum(p.numel() for p in model.parameters())
    with OffloadEngine.from_model(model, EngineConfig(cache_slots=2)) as engine:
        names = [name for name, _ in engine.model.named_parameters()]
        assert not [name for name in names if ".mlp.experts." in name]
        assert sum(p.numel() for p in engine.model.parameters()) == before - experts_numel
        assert any("shared_experts" in name for name in names)  # shared experts stay resident


def test_disk_store_round_trip_and_mismatch(tiny_models, tmp_path):
    adapter = adapter_for(tiny_models("mixtral"))
    path = tmp_path / "experts.safetensors"
    store = DiskExpertStore.write(adapter, path)
    for layer in range(len(adapter.layers)):
        for expert in (0, adapter.num_experts - 1):
            gate_up, down = adapter.shape.unpack(store.source(layer, expert))
            assert torch.equal(gate_up, adapter.layers[layer].experts.gate_up_proj[expert])
            assert torch.equal(down, adapter.layers[layer].experts.down_proj[expert])
    store.close()
    other = adapter_for(tiny_models("qwen3_moe"))  # another expert size
    with pytest.raises(ModelError, match="does not match"):
        DiskExpertStore(path, other.shape, len(other.layers), other.num_experts)
