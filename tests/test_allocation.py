"""Budgets, allocations (uniform, shared, profile), warm request streams and prefill bypass in the cache and the
simulator: parsing, UCP partitioning, shared-pool invariants under a buggy plug-in, fast path = general path."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_env.allocation import Allocation, fit_profile, hit_curves, parse_budget, partition, trace_streams
from moe_env.cache import ExpertCacheState
from moe_env.costmodel import CostModel, ExpertProfile, HardwareProfile
from moe_env.errors import UsageError
from moe_env.policy import ModelSpec, Policy, RouteEvent, build_policy
from moe_env.routing import LayerRouting, route_events
from moe_env.sim import simulate
from moe_env.trace import SequenceTrace, Trace, TraceMeta

KERNEL_POLICIES = ["lru", "lfu", "fifo", "belady"]


def _cost() -> CostModel:
    hardware = HardwareProfile("test", 1.0, 0.0, 10.0, 0.5)
    return CostModel(hardware, ExpertProfile("test", 1_000_000_000, 2, 4, 1))


# ---------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize(
    ("text", "slots"),
    [("6GiB", 6), ("6.5GiB", 6), ("2GB", 1), ("0.25", 16), ("25%", 16), ("1.0", 64), ("96", 64), ("10", 10)],
)
def test_budget_syntax_is_unambiguous(text, slots):
    # 8 layers x 8 experts of 1 GiB: bytes floor to whole experts, fractions of all 64, integers are slots
    assert parse_budget(text).total_slots(8, 8, 2**30) == slots


@pytest.mark.parametrize("text", ["", "abc", "0", "1.5", "0.0", "6 parsecs", "-3", "120%"])
def test_bad_budget_is_a_usage_error(text):
    with pytest.raises(UsageError):
        parse_budget(text)


def test_uniform_allocation_below_top_k_is_refused():
    with pytest.raises(UsageError, match="top-k=2"):
        Allocation.uniform(4, 8, 1).check(2)
    Allocation.one_pool(4, 8, 2).check(2)  # a shared pool of 2 slots can hold any one token's 2 experts


# ---------------------------------------------------------------------------------------------- UCP
def test_hit_curves_are_lru_stack_distances():
    # layer 0: 0 1 0 2 1 -> depths inf inf 2 inf 3 ; layer 1: 5 5 5 -> inf 1 1
    curves = hit_curves([[[0, 1, 0, 2, 1], [5, 5, 5]]], num_layers=2, num_experts=8)
    assert curves[0].tolist()[:5] == [0, 0, 1, 2, 2]
    assert curves[1].tolist()[:3] == [0, 2, 2]
    # and they equal the simulator's LRU at every size (one event per access, top-1)
    trace = _trace(np.array([[[0], [5]], [[1], [5]], [[0], [5]], [[2], [6]], [[1], [5]]]), 8)
    curves = hit_curves(trace_streams(trace), num_layers=2, num_experts=8)
    for slots in range(1, 6):
        per_layer = [simulate(_one_layer(trace, layer), "lru", slots, _cost()).hits for layer in range(2)]
        assert per_layer == [int(curves[0, slots]), int(curves[1, slots])]


def test_ucp_gives_slots_where_they_buy_hits_and_sees_past_a_plateau():
    flat = np.array([0, 10, 10, 10, 10])  # one slot is all layer 0 needs
    cliff = np.array([0, 1, 1, 1, 40])  # layer 1 gains nothing until it holds all four: lookahead finds it
    assert partition(np.stack([flat, cliff]), total=6, minimum=1) == [2, 4]
    assert sum(partition(np.stack([flat, flat, cliff]), total=9, minimum=1)) == 9
    with pytest.raises(UsageError):
        partition(np.stack([flat, cliff]), total=1, minimum=1)


def test_profile_is_fitted_on_a_training_trace():
    # layer 0 reuses two experts, layer 1 cycles through four: the profile gives layer 1 the spare slots
    rows = [[[i % 2], [i % 4]] for i in range(40)]
    trace = _trace(np.array(rows), 4)
    allocation = fit_profile(trace, total=6)
    assert allocation.pool_slots == (2, 4) and allocation.total_slots == 6 and not allocation.shared
    assert simulate(trace, "lru", allocation, _cost()).hits > simulate(trace, "lru", 3, _cost()).hits


# ---------------------------------------------------------------------------------------------- invariants
class Adversary(Policy):
    """A buggy plug-in: random scores (some infinite) and prefetches of anything, in-flight experts included."""

    ranks_across_layers = True
    name = "adversary"

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def eviction_scores(self, layer, candidates, cache):
        scores = self.rng.normal(size=len(candidates))
        scores[self.rng.random(len(candidates)) < 0.2] = -np.inf
        return scores

    def prefetch(self, event, cache):
        n = int(self.rng.integers(0, 6))
        return [(int(self.rng.integers(cache.spec.num_layers)), int(self.rng.integers(cache.spec.num_experts)))
                for _ in range(n)]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), layers=st.integers(1, 4), experts=st.integers(2, 8), top_k=st.integers(1, 3),
       extra=st.integers(0, 8), warm=st.booleans(), bypass=st.booleans())  # fmt: skip
def test_shared_pool_invariants_under_a_buggy_policy(seed, layers, experts, top_k, extra, warm, bypass):
    top_k = min(top_k, experts)
    total = min(top_k + extra, layers * experts)
    spec = ModelSpec(layers, experts, top_k, expert_bytes=1000)
    rng = np.random.default_rng(seed)
    allocation = Allocation.one_pool(layers, experts, total)
    cache = ExpertCacheState(spec, allocation, Adversary(seed), prefill="bypass" if bypass else "chunked")
    accesses = 0
    for _ in range(3):
        cache.begin_sequence(warm=warm)
        in_flight = {layer: set() for layer in range(layers)}
        routings = [LayerRouting(layer, -1, rng.integers(0, experts, (5, top_k))) for layer in range(layers)]
        routings += [LayerRouting(layer, step, rng.choice(experts, (1, top_k), replace=False))
                     for step in range(12) for layer in range(layers)]  # fmt: skip
        for routing in routings:
            for event in route_events(routing, cache):
                before = {(layer, e) for layer in range(layers) for e in cache.resident(layer)}
                plan = cache.route(event)
                resident = [(layer, e) for layer in range(layers) for e in cache.resident(layer)]
                # capacity in bytes never exceeded: the pool holds at most `total` experts, each in its own slot
                assert len(resident) <= total
                assert len(resident) * spec.expert_bytes <= total * spec.expert_bytes
                slots = [cache.slot_of(layer, e) for layer, e in resident]
                assert len(set(slots)) == len(slots) and all(0 <= s < total for s in slots)
                # nothing needed evicted: every (non-bypassed) expert of the event is resident after the plan
                for expert, slot, hit in zip(event.experts, plan.slots, plan.hit, strict=True):
                    if slot >= 0:
                        assert cache.slot_of(event.layer, expert) == slot
                    else:
                        assert event.bypass and not hit and expert in plan.bypass
                # a prefetch never evicts an expert in flight (the layer's own acquire consumes its in-flight
                # prefetches first); nothing evicted was absent or is needed now
                for load in plan.loads + plan.prefetches:
                    if load.prefetch:
                        in_flight[event.layer] = set()
                    if load.evicted < 0:
                        continue
                    assert (load.evicted_layer, load.evicted) in before
                    assert not (load.evicted_layer == event.layer and load.evicted in event.experts)
                    if load.prefetch:
                        assert load.evicted not in in_flight[load.evicted_layer]
                    in_flight[load.evicted_layer].discard(load.evicted)  # a demand load's last resort
                accesses += len(event.experts)
                in_flight[event.layer] = set()
                for load in plan.prefetches:
                    in_flight[load.layer].add(load.expert)
                if event.bypass:
                    assert plan.loads == [] and len(plan.bypass) == sum(not h for h in plan.hit)
        cache.finish()
    c = cache.counters
    assert c.hits + c.misses + c.prefill_hits + c.prefill_misses == accesses
    assert c.prefetch_used + c.prefetch_wasted == c.prefetch_issued  # every prefetch is used or wasted
    assert c.bytes_moved == (c.misses + c.prefill_misses + c.prefetch_issued) * spec.expert_bytes
    assert c.bypass_loads <= c.prefill_misses and (bypass or c.bypass_loads == 0)


def test_a_policy_that_cannot_rank_across_layers_is_refused_for_a_shared_pool():
    spec = ModelSpec(2, 4, 1)
    with pytest.raises(UsageError, match="across layers"):
        ExpertCacheState(spec, Allocation.one_pool(2, 4, 3), build_policy("lfuda"))
    ExpertCacheState(spec, Allocation.one_pool(2, 4, 3), build_policy("lru"))


def test_shared_pool_evicts_the_globally_least_recent_expert():
    spec = ModelSpec(2, 4, 1)
    cache = ExpertCacheState(spec, Allocation.one_pool(2, 4, 2), build_policy("lru"))
    for layer, expert in [(0, 0), (1, 0), (1, 1)]:
        cache.route(RouteEvent(0, layer, (expert,)))
    assert cache.resident(0) == [] and sorted(cache.resident(1)) == [0, 1]  # layer 0's expert was the oldest


# ---------------------------------------------------------------------------------------------- warm, bypass
def test_warm_keeps_the_working_set_across_requests():
    one = [[[0, 1]], [[1, 2]], [[0, 2]]]
    trace = Trace(_trace(np.array(one), 4).meta, [SequenceTrace(np.asarray(one, dtype=np.int16))] * 2)
    cold = simulate(trace, "lru", 3, _cost(), fast=False)
    warm = simulate(trace, "lru", 3, _cost(), fast=False, warm=True)
    assert (cold.hits, cold.misses) == (6, 6)  # 3 compulsory misses per request, twice
    assert (warm.hits, warm.misses) == (9, 3)  # the second request finds all three experts resident
    assert warm.first_hit_rate == warm.hit_rate  # all 3 steps of each request are among the first tokens


def test_bypass_prefill_keeps_the_decode_working_set():
    # 1 layer, 2 slots; prompt touches 4 experts; decode keeps using 0 and 1 (resident from a first request)
    decode = np.asarray([[[0, 1]]] * 4, dtype=np.int16)
    prompt = np.asarray([[[2, 3]], [[4, 5]]], dtype=np.int16)
    meta = TraceMeta("toy", 1, 6, 2, "test", expert_bytes=1_000_000_000)
    first, second = SequenceTrace(decode), SequenceTrace(decode, prefill_experts=prompt)
    trace = Trace(meta, [first, second])
    chunked = simulate(trace, "lru", 2, _cost(), warm=True)
    bypass = simulate(trace, "lru", 2, _cost(), warm=True, prefill="bypass")
    assert chunked.misses == 2 + 2  # the chunked prefill flushed 0 and 1: the second request misses them again
    assert bypass.misses == 2 and bypass.bypass_loads == 4 and bypass.prefill_misses == 4
    assert bypass.first_hit_rate > chunked.first_hit_rate


# ---------------------------------------------------------------------------------------------- fast = general
def _trace(experts: np.ndarray, num_experts: int, prefill: np.ndarray | None = None, n: int = 1) -> Trace:
    meta = TraceMeta("toy", experts.shape[1], num_experts, experts.shape[2], "test", expert_bytes=1_000_000_000)
    return Trace(meta, [SequenceTrace(np.asarray(experts, dtype=np.int16), prefill_experts=prefill)] * n)


def _one_layer(trace: Trace, layer: int) -> Trace:
    meta = trace.meta
    one = TraceMeta(meta.model, 1, meta.num_experts, meta.top_k, meta.source, expert_bytes=meta.expert_bytes)
    return Trace(one, [SequenceTrace(seq.experts[:, layer : layer + 1]) for seq in trace.sequences])


def _assert_same(fast, general):
    for name in ("hits", "misses", "prefill_hits", "prefill_misses", "evictions", "bytes_moved", "first_hit_rate",
                 "decode_tokens", "stall_s", "prefill_stall_s", "decode_time_s", "total_slots"):  # fmt: skip
        assert getattr(fast, name) == pytest.approx(getattr(general, name), rel=1e-9), name


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), experts=st.integers(2, 8), top_k=st.integers(1, 3), extra=st.integers(0, 12),
       prompt=st.integers(0, 5), warm=st.booleans(), kind=st.sampled_from(["shared", "profile"]))  # fmt: skip
def test_fast_path_equals_general_path_for_allocations_and_warm(seed, experts, top_k, extra, prompt, warm, kind):
    top_k = min(top_k, experts)
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(experts, 0.4))

    def rows(n):
        return np.asarray([[rng.choice(experts, top_k, replace=False, p=skew) for _ in range(3)] for _ in range(n)])

    sequences = []
    for _ in range(3):
        decode = rows(int(rng.integers(1, 20)))
        decode[rng.random(decode.shape[:2]) < 0.1] = -1
        sequences.append(
            SequenceTrace(decode.astype(np.int16), prefill_experts=rows(prompt).astype(np.int16) if prompt else None)
        )
    meta = TraceMeta("toy", 3, experts, top_k, "test", expert_bytes=1_000_000_000)
    trace = Trace(meta, sequences)
    if kind == "shared":
        allocation = Allocation.one_pool(3, experts, min(top_k + extra, 3 * experts))
    else:
        allocation = Allocation.per_layer(
            "profile", experts, [min(top_k + int(rng.integers(0, extra + 1)), experts) for _ in range(3)]
        )
    for policy in KERNEL_POLICIES:
        fast = simulate(trace, policy, allocation, _cost(), warm=warm)
        _assert_same(fast, simulate(trace, policy, allocation, _cost(), fast=False, warm=warm))


@pytest.mark.parametrize(
    ("policy", "prefetch", "allocation", "warm", "prefill"),
    [("lru", None, "shared", True, "bypass"), ("lfu", "lookahead", "shared", False, "chunked"),
     ("lru", "lookahead", "uniform", True, "bypass")],
)  # fmt: skip
def test_engine_and_simulator_agree_for_allocations_warm_and_bypass(tmp_path, policy, prefetch, allocation, warm,
                                                                    prefill):  # fmt: skip
    """The engine serving two prompts and the simulator replaying their recorded trace count the same."""
    from moe_env.commands.record import record_trace
    from moe_env.engine import EngineConfig, OffloadEngine
    from moe_env.models.tiny import byte_tokenizer, tiny_model
    from moe_env.prompts import Prompt

    model_dir = tmp_path / "model"
    tiny_model("mixtral", seed=0, vocab_size=256).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    config = EngineConfig(model=str(model_dir), cache_budget="0.375", allocation=allocation, policy=policy,
                          prefetch=prefetch, warm=warm, prefill=prefill, store_dir=str(tmp_path / "store"))  # fmt: skip
    prompts = [Prompt("a", "def area(r):", "eval"), Prompt("b", "The river rose.", "eval")]
    results = []
    with OffloadEngine(config) as engine:
        engine.on_sequence_end(results.append)
        trace = record_trace(engine, prompts, 6, model_name="random")
        layout = engine.cache_state.allocation
    result = simulate(trace, policy, layout, "consumer-pcie4", prefetch=prefetch, warm=warm, prefill=prefill)
    for name in ("hits", "misses", "prefill_hits", "prefill_misses", "prefetch_issued", "prefetch_used",
                 "bypass_loads"):  # fmt: skip
        assert getattr(result, name) == sum(getattr(r.metrics, name) for r in results), name
    assert (result.bypass_loads > 0) == (prefill == "bypass")


def test_bench_budget_sweep_and_memory_at_equal_hit_rate_in_single_slots(tmp_path, capsys):
    import json

    from moe_env.cli import main
    from moe_env.commands.bench import BudgetBench
    from moe_env.trace import load_trace, save_trace

    rng = np.random.default_rng(3)
    skew = rng.dirichlet(np.full(8, 0.5), size=3)
    sequences = [SequenceTrace(np.asarray([[rng.choice(8, 2, replace=False, p=skew[layer]) for layer in range(3)]
                                           for _ in range(30)], dtype=np.int16)) for _ in range(4)]  # fmt: skip
    meta = TraceMeta("toy", 3, 8, 2, "test", expert_bytes=1_000_000_000)
    path = str(save_trace(Trace(meta, sequences), tmp_path / "t.npz"))
    argv = ["bench", "--trace", path, "--policies", "lru,belady", "--cache-budget", "9,12,15",
            "--allocation", f"uniform,shared,profile:{path}", "--warm", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 3 * 2 * 3 and all(r["warm"] for r in out["rows"])
    assert {r["total_slots"] for r in out["rows"]} == {9, 12, 15}
    bench = BudgetBench(path, load_trace(path), None, True, "chunked", load_trace)
    for item in out["memory_at_equal_hit_rate"]:
        assert item["reference_slots"] == 12 and item["slots_needed"] is not None
        needed, step = item["slots_needed"], bench.step(item["allocation"])
        result = bench.result(item["policy"], "none", item["allocation"], needed)
        assert result.hit_rate >= item["target_hit_rate"]
        if needed - step >= bench.lowest(item["allocation"]):  # one step less misses the target
            less = bench.result(item["policy"], "none", item["allocation"], needed - step)
            assert less.hit_rate < item["target_hit_rate"]
        assert item["bytes_needed"] == needed * 1_000_000_000
        if item["allocation"] != "uniform":
            assert step == 1  # shared and profile move one expert's bytes at a time
    assert main(["bench", "--trace", path, "--cache-budget", "9", "--allocation", "diagonal"]) == 2
    assert main(["bench", "--trace", path, "--warm"]) == 2


def test_env_budget_profile_and_warm_request_stream(tmp_path):
    from moe_env.env import MoEOffloadEnv
    from moe_env.trace import save_trace

    rng = np.random.default_rng(5)
    sequences = [SequenceTrace(np.asarray([[rng.choice(8, 2, replace=False) for _ in range(3)] for _ in range(6)],
                                          dtype=np.int16)) for _ in range(3)]  # fmt: skip
    trace = Trace(TraceMeta("toy", 3, 8, 2, "test", expert_bytes=1_000_000_000), sequences)
    path = str(save_trace(trace, tmp_path / "t.npz"))
    for warm in (False, True):
        env = MoEOffloadEnv(trace, budget="12", allocation=f"profile:{path}", warm=warm, profile="consumer-pcie4")
        assert env.cache.allocation.total_slots == 12
        order, resident_at_start = [], []
        for _ in range(4):
            env.reset(seed=0)
            order.append(env.sequence_index)
            resident_at_start.append(sum(len(env.cache.resident(layer)) for layer in range(3)))
            done = False
            while not done:
                _, _, done, _, _ = env.step(np.zeros(8, dtype=np.float32))
        if warm:
            assert order == [0, 1, 2, 0]  # in order; cold again when the stream wraps around
            assert resident_at_start[1] > 0 and resident_at_start[2] > 0 and resident_at_start[3] == 0
        else:
            assert resident_at_start == [0, 0, 0, 0]
    with pytest.raises(UsageError, match="across layers"):
        MoEOffloadEnv(trace, budget="12", allocation="shared")
