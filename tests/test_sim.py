"""The simulator: reference hit rates on real Mixtral routing, the oracle's clock, and the time model by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_env.costmodel import CostModel, ExpertProfile, HardwareProfile
from moe_env.errors import UsageError
from moe_env.policy import Policy, build_policy
from moe_env.sim import Replayer, TraceOracle, simulate
from moe_env.trace import SequenceTrace, Trace, TraceMeta, load_trace

SHARED_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mixtral-8x7b-gsm8k-routing.jsonl"
PROFILE = "consumer-pcie4:mixtral-8x7b-fp16"

# ../shared/traces/README.md: per-layer demand cache, hit rate over all layers and both sequences
REFERENCE = {3: {"lru": 0.469, "lfu": 0.490, "belady": 0.584}, 4: {"lru": 0.598, "lfu": 0.612, "belady": 0.727},
             5: {"lru": 0.704, "lfu": 0.721, "belady": 0.822}}  # fmt: skip


@pytest.fixture(scope="module")
def mixtral_trace() -> Trace:
    if not SHARED_TRACE.exists():
        pytest.skip("../shared/traces is absent")
    return load_trace(SHARED_TRACE)


@pytest.mark.parametrize("slots", [3, 4, 5])
def test_reference_hit_rates_on_real_mixtral_routing(mixtral_trace, slots):
    for policy, expected in REFERENCE[slots].items():
        result = simulate(mixtral_trace, policy, slots, PROFILE)
        assert result.hits + result.misses == mixtral_trace.num_accesses
        assert result.hit_rate == pytest.approx(expected, abs=0.005), (policy, slots)


def _cost(copy_s: float = 1.0, expert_s: float = 0.1, layer_s: float = 0.5) -> CostModel:
    """Round numbers: 1 GB experts over a 1/copy_s GB/s link, no latency."""
    hardware = HardwareProfile("test", 1.0 / copy_s, 0.0, 1.0 / expert_s, layer_s)
    return CostModel(hardware, ExpertProfile("test", 1_000_000_000, 2, 4, 1))


def _trace(rows: list[list[list[int]]], num_experts: int = 4, **arrays) -> Trace:
    experts = np.asarray(rows, dtype=np.int16)
    meta = TraceMeta("toy", experts.shape[1], num_experts, experts.shape[2], "test", expert_bytes=1_000_000_000)
    return Trace(meta, [SequenceTrace(experts=experts, **arrays)])


def test_time_model_by_hand():
    # one layer, one slot: miss (stall 1.0), hit on a landed copy (no stall), miss (stall 1.0)
    result = simulate(_trace([[[0]], [[0]], [[1]]]), "lru", 1, _cost())
    assert (result.hits, result.misses, result.decode_tokens) == (1, 2, 3)
    assert result.stall_s == pytest.approx(2.0)
    assert result.decode_time_s == pytest.approx(3.8)  # 3 x 0.5 layer + 3 x 0.1 expert + 2.0 stall
    assert result.tokens_per_s == pytest.approx(3 / 3.8)
    assert result.stall_s_per_token == pytest.approx(2.0 / 3)
    assert result.bytes_moved == 2 * 1_000_000_000


class _FixedPrefetch(Policy):
    """Prefetch one fixed expert of layer 1 after layer 0."""

    prefetch_only = True

    def __init__(self, expert: int):
        self.expert = expert

    def prefetch(self, event, cache):
        return [(1, self.expert)] if event.layer == 0 else []


@pytest.mark.parametrize(
    "prefetch, stall, hits",
    [
        (None, 2.0, 0),
        # right: lands at 2.5 (queued behind layer 0's demand load), layer 1 starts at 2.1 -> waits 0.4
        (_FixedPrefetch(1), 1.4, 1),
        # wrong: the demand load of layer 1 queues behind the useless copy: lands at 3.5 instead of 3.1
        (_FixedPrefetch(2), 2.4, 0),
    ],
)
def test_prefetch_overlaps_and_wrong_prefetch_delays_demand_loads(prefetch, stall, hits):
    trace = _trace([[[0], [1]]])
    result = simulate(trace, build_policy("lru", prefetch), 1, _cost())
    assert result.stall_s == pytest.approx(stall)
    assert result.hits == hits
    assert result.prefetch_issued == (0 if prefetch is None else 1)
    assert result.prefetch_used + result.prefetch_wasted == result.prefetch_issued


class _NextUseSpy(Policy):
    """LRU that records cache.next_use for every expert at every decision, and every access's clock."""

    def reset(self, spec, capacity):
        super().reset(spec, capacity)
        self.accesses: list[tuple[int, int, int]] = []  # (clock, layer, expert)
        self.answers: list[tuple[int, int, int, float]] = []  # (clock, layer, expert, next_use)

    def observe(self, event, cache):
        for i, expert in enumerate(event.experts):
            self.accesses.append((cache.clock + 1 + i, event.layer, expert))

    def _ask(self, layer, cache):
        for expert in range(self.spec.num_experts):
            self.answers.append((cache.clock, layer, expert, cache.next_use(layer, expert)))

    def eviction_scores(self, layer, candidates, cache):
        self._ask(layer, cache)
        return super().eviction_scores(layer, candidates, cache)

    def prefetch(self, event, cache):
        self._ask((event.layer + 1) % self.spec.num_layers, cache)
        return []


def test_oracle_counts_clock_exactly_as_the_cache_does():
    rng = np.random.default_rng(3)
    decode = np.stack([np.stack([rng.choice(6, 2, replace=False) for _ in range(3)]) for _ in range(20)])
    decode[[3, 4, 11], [1, 2, 0]] = -1  # absent cells are skipped by the replay and by the clock
    prefill = np.stack([np.stack([rng.choice(6, 2, replace=False) for _ in range(3)]) for _ in range(5)])
    trace = _trace(decode.tolist(), num_experts=6, prefill_experts=prefill.astype(np.int16))
    spy = _NextUseSpy()
    replayer = Replayer(trace.meta, spy, 3, _cost(), with_oracle=True)
    replayer.begin_sequence(trace.sequences[0])
    for routing in trace.sequences[0].routings():
        replayer.process(routing)
    assert spy.accesses[-1][0] == replayer.cache.clock  # the spy's clock numbering is the cache's
    assert len(spy.answers) > 100
    for clock, layer, expert, answer in spy.answers:
        future = [c for c, lay, e in spy.accesses if lay == layer and e == expert and c > clock]
        assert answer == (future[0] - clock if future else math.inf)


def test_oracle_future_experts_and_bounds():
    trace = _trace([[[0], [1]], [[2], [-1]]])
    oracle = TraceOracle(trace.sequences[0], 2, 4, 1)
    assert oracle.future_experts(0, 1) == (1,)
    assert oracle.future_experts(1, 0) == (2,)
    assert oracle.future_experts(1, 1) is None  # absent cell
    assert oracle.future_experts(2, 0) is None  # past the end
    assert oracle.future_experts(-1, 0) is None  # prefill


def test_stepwise_replayer_equals_simulate(mixtral_trace):
    expected = simulate(mixtral_trace, "belady", 4, PROFILE, prefetch="oracle")
    replayer = Replayer(mixtral_trace.meta, build_policy("belady", "oracle"), 4, _cost_for(mixtral_trace))
    stall = 0.0
    for sequence in mixtral_trace.sequences:
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            outcome = replayer.process(routing)
            assert outcome.layer == routing.layer and outcome.stall_s >= 0 and outcome.link_backlog_s >= 0
            stall += outcome.stall_s
    result = replayer.finish()
    assert result == expected
    assert stall == pytest.approx(result.stall_s)
    assert result.prefetch_precision == 1.0  # the oracle is never wrong


def _cost_for(trace):
    from moe_env.sim import cost_model_for

    return cost_model_for(trace.meta, PROFILE)


def test_prefill_is_counted_apart_from_decode():
    prefill = np.asarray([[[0], [1]], [[2], [3]], [[0], [1]]], dtype=np.int16)
    trace = _trace([[[0], [1]], [[2], [3]]], prefill_experts=prefill)
    result = simulate(trace, "lru", 2, _cost())
    assert result.prefill_hits + result.prefill_misses == 4  # per layer the union {0, 2} / {1, 3}
    assert result.hits + result.misses == 4
    assert result.decode_tokens == 2 and result.prefill_stall_s > 0


def test_bad_budget_and_oracle_without_sequence_are_usage_errors():
    trace = _trace([[[0, 1]]])
    with pytest.raises(UsageError, match=r"cache slots 1 outside 2\.\.4"):
        simulate(trace, "lru", 1, _cost())
    replayer = Replayer(trace.meta, build_policy("belady"), 2, _cost())
    with pytest.raises(UsageError, match="reads the future"):
        replayer.begin_sequence()


KERNEL_POLICIES = ["lru", "lfu", "fifo", "belady"]


def _assert_same(fast, general):
    for name in ("hits", "misses", "prefill_hits", "prefill_misses", "evictions", "bytes_moved", "decode_tokens"):
        assert getattr(fast, name) == getattr(general, name), name
    for name in ("stall_s", "prefill_stall_s", "decode_time_s", "tokens_per_s"):
        assert getattr(fast, name) == pytest.approx(getattr(general, name), rel=1e-9), name


@pytest.mark.parametrize("policy", KERNEL_POLICIES)
def test_fast_path_equals_general_path_on_real_routing(mixtral_trace, policy):
    for slots in (2, 3, 4, 6):
        _assert_same(
            simulate(mixtral_trace, policy, slots, PROFILE), simulate(mixtral_trace, policy, slots, PROFILE, fast=False)
        )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), experts=st.integers(2, 8), top_k=st.integers(1, 3), extra=st.integers(0, 3),
       prompt=st.integers(0, 6))  # fmt: skip
def test_fast_path_equals_general_path_on_random_traces(seed, experts, top_k, extra, prompt):
    top_k = min(top_k, experts)
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(experts, 0.4))

    def rows(n):
        return np.asarray([[rng.choice(experts, top_k, replace=False, p=skew) for _ in range(3)] for _ in range(n)])

    decode = rows(int(rng.integers(1, 30)))
    decode[rng.random(decode.shape[:2]) < 0.1] = -1  # absent cells
    trace = _trace(
        decode.tolist(), num_experts=experts, prefill_experts=rows(prompt).astype(np.int16) if prompt else None
    )
    capacity = min(top_k + extra, experts)
    for policy in KERNEL_POLICIES:
        _assert_same(simulate(trace, policy, capacity, _cost()), simulate(trace, policy, capacity, _cost(), fast=False))


def test_fast_path_is_not_inherited():
    from moe_env.policies.lru import LRUPolicy

    class MostRecentlyUsed(LRUPolicy):
        def eviction_scores(self, layer, candidates, cache):
            return -super().eviction_scores(layer, candidates, cache)

    trace = _trace([[[0]], [[1]], [[0]], [[2]], [[0]]])
    assert simulate(trace, MostRecentlyUsed(), 2, _cost()).hits == 1  # MRU, not LRU's 2


# ---------------------------------------------------------------------------------------------- moe-env bench


BENCH_ROW_KEYS = ("trace", "policy", "prefetch", "allocation", "layout", "slots", "total_slots", "bytes", "warm",
                  "prefill", "hits", "misses", "hit_rate", "first_hit_rate", "gap_captured", "prefetch_precision",
                  "prefetch_recall", "bytes_moved", "stall_s_per_token", "tokens_per_s")  # fmt: skip


@pytest.fixture
def saved_trace(tmp_path):
    from moe_env.trace import save_trace

    rng = np.random.default_rng(1)
    skew = rng.dirichlet(np.full(6, 0.5), size=3)
    rows = [[rng.choice(6, 2, replace=False, p=skew[layer]) for layer in range(3)] for _ in range(80)]
    return str(save_trace(_trace(np.asarray(rows).tolist(), num_experts=6), tmp_path / "t.npz"))


def test_bench_json_rows_and_gap(saved_trace, capsys):
    from moe_env.cli import main

    argv = ["bench", "--trace", saved_trace, "--policies", "lfu-decay:decay=0.9,fifo", "--cache-slots", "2,3,4"]
    assert main([*argv, "--prefetch", "none,oracle", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 2 * 3
    assert list(rows[0]) == list(BENCH_ROW_KEYS)  # the one schema of slot and budget sweeps (moe_env/bench_rows.py)
    assert {r["policy"] for r in rows} == {"lfu-decay:decay=0.9", "fifo"}
    trace = load_trace(saved_trace)
    for row in rows:
        if row["prefetch"] != "none":
            continue
        lru, opt = (simulate(trace, p, row["slots"], "consumer-pcie4").hit_rate for p in ("lru", "belady"))
        if opt == lru:  # 2 slots, top-2: every token replaces the whole pool, nothing to choose
            assert row["gap_captured"] is None
        else:
            assert row["gap_captured"] == pytest.approx((row["hit_rate"] - lru) / (opt - lru))
        assert row["hits"] + row["misses"] == trace.num_accesses
    assert all(r["prefetch_precision"] == 1.0 for r in rows if r["prefetch"] == "oracle")


def test_bench_table_plots_and_memory_at_equal_hit_rate(saved_trace, tmp_path, capsys):
    from moe_env.cli import main

    plots = tmp_path / "plots"
    argv = [
        "bench",
        "--trace",
        saved_trace,
        "--policies",
        "lru,belady",
        "--cache-slots",
        "2,3,4",
        "--plots",
        str(plots),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "memory at equal hit rate (LRU's hit rate at 3 slots" in out
    assert "stall_ms/tok" in out
    assert sorted(p.name for p in plots.glob("*.png")) == ["t-hit-rate.png", "t-stall-s-per-token.png"]
    from moe_env.commands.bench import Bench

    bench = Bench(saved_trace, load_trace(saved_trace), None)
    iso = bench.iso_hit_rate("belady", "none", 3)
    assert iso.slots_needed is not None and iso.slots_needed <= 3
    assert bench.result("belady", "none", iso.slots_needed).hit_rate >= iso.lru_hit_rate
    if iso.slots_needed > 2:
        assert bench.result("belady", "none", iso.slots_needed - 1).hit_rate < iso.lru_hit_rate
    assert iso.bytes_saved == (3 - iso.slots_needed) * 3 * 1_000_000_000
    # with a prefetcher the target is LRU's stall per token (a prefetched "hit" may still wait for its copy)
    oracle = bench.iso_hit_rate("lru", "oracle", 3)
    lru_stall = bench.result("lru", "none", 3).stall_s_per_token
    assert bench.result("lru", "oracle", oracle.slots_needed).stall_s_per_token <= lru_stall
    assert oracle.target() == f"{1e3 * lru_stall:.2f} ms/token" and iso.target() == f"{iso.lru_hit_rate:.3f}"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--policies", "nosuch"], "unknown policy 'nosuch'"),
        (["--policies", "lookahead"], "is a prefetcher"),
        (["--prefetch", "lfu"], "not a prefetcher"),
        (["--cache-slots", "a,b"], "--cache-slots must be integers"),
        (["--cache-slots", "1,2"], "cache slots 1 outside 2..6"),
        (["--profile", "gpu9000"], "unknown hardware profile"),
    ],
)
def test_bench_bad_input_is_one_line_and_exit_2(saved_trace, capsys, extra, fragment):
    from moe_env.cli import main

    assert main(["bench", "--trace", saved_trace, "--json", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("policy", "prefetch"), [("lfu", None), ("lru", "lookahead")])
def test_simulator_counters_equal_the_real_engine(tmp_path, policy, prefetch):
    """Record a tiny random-weight Mixtral through the offload engine; the simulator's counters are the engine's."""
    from moe_env.commands.record import record_trace
    from moe_env.engine import EngineConfig, OffloadEngine
    from moe_env.models.tiny import byte_tokenizer, tiny_model
    from moe_env.prompts import Prompt

    model_dir = tmp_path / "model"
    tiny_model("mixtral", seed=0, vocab_size=256).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    config = EngineConfig(model=str(model_dir), cache_slots=3, policy=policy, prefetch=prefetch,
                          store_dir=str(tmp_path / "store"))  # fmt: skip
    prompts = [Prompt("a", "def area(r):", "eval"), Prompt("b", "The river rose.", "eval")]
    results = []
    with OffloadEngine(config) as engine:
        engine.on_sequence_end(results.append)
        trace = record_trace(engine, prompts, 6, model_name="random")
    assert len(results) == 2
    result = simulate(trace, policy, 3, "consumer-pcie4", prefetch=prefetch)
    assert result.hits + result.misses == trace.num_accesses
    for name in ("hits", "misses", "prefill_hits", "prefill_misses", "prefetch_issued", "prefetch_used"):
        assert getattr(result, name) == sum(getattr(r.metrics, name) for r in results), name
    assert (result.prefetch_issued > 0) == (prefetch is not None)
