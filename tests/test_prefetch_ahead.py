"""Multi-layer-ahead prefetch of the set predictor: causality, the horizon on three shapes and beyond the last
layer, the in-flight budget, refusal of a missing signal, and the chained inter-layer signal."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from moe_env.agents.candidate_features import FEATURES
from moe_env.agents.model_tables import build_tables
from moe_env.agents.predictor import copy_ratio
from moe_env.agents.prefetch_predictor import PredictorPrefetch, shipped_predictor_path
from moe_env.agents.set_predictor import (
    PredictionFeatures,
    ahead_quality,
    decode_events,
    predict_ahead,
    soft_coactivation,
)
from script_modules import load_script
from test_env import synthetic_trace
from test_learned_predictor import _shapes, _train_small, _with_tokens

from moe_env.errors import CheckpointError, UsageError
from moe_env.policy import CombinedPolicy, make_policy
from moe_env.sim import cost_model_for, model_spec, simulate
from moe_env.trace import Trace


def _deep(sequences: int = 5, steps: int = 24) -> Trace:
    return _with_tokens(synthetic_trace(sequences=sequences, steps=steps, layers=6, experts=8, top_k=2))


@pytest.fixture(scope="module")
def deep_predictor(tmp_path_factory):
    import torch

    torch.manual_seed(0)  # the network's initial weights: the same whichever tests ran before
    trace = _deep()
    return _train_small(Trace(trace.meta, trace.sequences[:4]), tmp_path_factory.mktemp("ahead") / "p.pt")


class _Recorder(PredictorPrefetch):
    """Records every decode prefetch request with its (step, layer), and the in-flight count it leaves."""

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.log: list[tuple[int, int, tuple]] = []
        self.flying_after: list[int] = []
        self.queued: list[int] = []

    def prefetch(self, event, cache):
        requests = tuple(super().prefetch(event, cache))
        if not event.prefill:
            self.log.append((event.step, event.layer, requests))
            ahead = range(event.layer + 1, self.spec.num_layers)
            flying = sum(len(cache.in_flight(m)) for m in ahead)
            new = {(m, e) for m, e in requests if not cache.is_resident(m, e)}
            self.flying_after.append(flying + len(new))
            self.queued.append(self._queued)
        return requests


def test_causal_with_a_horizon_permuting_the_future_does_not_change_earlier_prefetches(deep_predictor):
    trace = _deep(sequences=1, steps=30)
    cut_step, cut_layer = 14, 2
    rng = np.random.default_rng(7)
    s = trace.sequences[0]
    experts = s.experts.copy()
    future = experts[cut_step + 1 :]
    experts[cut_step + 1 :] = future[rng.permutation(len(future))]  # later tokens shuffled
    experts[cut_step, cut_layer + 1 :] = experts[cut_step, cut_layer + 1 :, ::-1]  # later layers of this token
    experts[cut_step, cut_layer + 1 :, 0] = (experts[cut_step, cut_layer + 1 :, 0] + 3) % 8
    bad = experts[cut_step, :, 0] == experts[cut_step, :, 1]
    experts[cut_step, bad, 0] = (experts[cut_step, bad, 0] + 1) % 8
    ids = s.output_ids.copy()
    ids[cut_step + 1 :] = rng.permutation(ids[cut_step + 1 :])
    altered = Trace(trace.meta, [replace(s, experts=experts, output_ids=ids)])
    logs = []
    for t in (trace, altered):
        recorder = _Recorder(deep_predictor, threshold=0.2, horizon=4)
        simulate(t, CombinedPolicy(make_policy("lru"), recorder), 4)
        logs.append(recorder.log)
    upto = [(step, layer) <= (cut_step, cut_layer) for step, layer, _ in logs[0]]
    before = [entry for entry, keep in zip(logs[0], upto, strict=True) if keep]
    assert before == logs[1][: len(before)]
    far = [m - layer for _, layer, requests in before for m, _ in requests]
    assert max(far) >= 3  # not vacuous: it prefetched 3+ layers ahead before the cut
    assert logs[0] != logs[1]  # and the altered future did change later prefetches


def test_horizon_runs_on_three_shapes_and_prefetches_layers_ahead(deep_predictor):
    path = shipped_predictor_path()
    if not path.is_file():
        pytest.skip("no shipped predictor")
    for label, trace, capacity in _shapes():
        recorder = _Recorder(path, threshold=0.05, horizon=3)
        result = simulate(trace, CombinedPolicy(make_policy("lru"), recorder), capacity)
        distances = {m - layer for _, layer, requests in recorder.log for m, _ in requests}
        assert result.prefetch_used > 0, label
        assert max(distances) == min(3, trace.meta.num_layers - 1), label  # clipped on shallow models
        assert min(distances) >= 1, label
        demand = simulate(trace, "lru", capacity)
        assert result.hits + result.misses == demand.hits + demand.misses, label


def test_horizon_beyond_the_last_layer_stops_there(deep_predictor):
    shallow = _with_tokens(synthetic_trace(sequences=1, layers=2, experts=6, top_k=2))
    recorder = _Recorder(deep_predictor, threshold=0.05, horizon=50)
    result = simulate(shallow, CombinedPolicy(make_policy("lru"), recorder), 3)
    assert recorder.horizon == 1 and result.prefetch_issued > 0
    assert all(m == layer + 1 for _, layer, requests in recorder.log for m, _ in requests)
    single = _with_tokens(synthetic_trace(sequences=1, layers=1, experts=6, top_k=2))
    recorder = _Recorder(deep_predictor, threshold=0.05, horizon="auto", copy_ratio=3.0)
    assert simulate(single, CombinedPolicy(make_policy("lru"), recorder), 3).prefetch_issued == 0


def test_auto_horizon_follows_the_copy_ratio(deep_predictor):
    trace = _deep(sequences=1)
    for ratio, horizon in ((1.0, 1), (2.96, 3), (9.95, 5)):  # 6 layers: at most 5 ahead
        prefetcher = PredictorPrefetch(deep_predictor, horizon="auto", copy_ratio=ratio)
        prefetcher.reset(model_spec(trace.meta), 4)
        assert prefetcher.horizon == horizon
    profiled = PredictorPrefetch(deep_predictor, horizon="auto")  # the simulator binds its cost model
    profile = "consumer-pcie4:deepseek-v2-lite"
    simulate(trace, CombinedPolicy(make_policy("lru"), profiled), 4, profile)
    ratio = copy_ratio(cost_model_for(trace.meta, profile), trace.meta.top_k)
    assert ratio > 2 and profiled.horizon == min(math.ceil(ratio), 5)


def test_max_in_flight_bounds_the_prefetches_queued_since_the_latest_demand_load(deep_predictor):
    trace = _deep(sequences=2)
    for limit in (1, 2):
        recorder = _Recorder(deep_predictor, threshold=0.05, horizon=4, max_in_flight=limit)
        result = simulate(trace, CombinedPolicy(make_policy("lru"), recorder), 4)
        assert result.prefetch_issued > 0
        assert max(recorder.queued) <= limit
        # the budget is refilled by demand loads, not by the prefetches' own layers routing: it issued while
        # earlier prefetches were still pending in the cache
        assert max(recorder.flying_after) > limit
    free = _Recorder(deep_predictor, threshold=0.05, horizon=4)
    simulate(trace, CombinedPolicy(make_policy("lru"), free), 4)
    assert max(free.queued) > 2  # the bound is what stopped them


def test_bad_horizon_or_in_flight_budget_is_refused_in_one_line(deep_predictor):
    for spec in (f"predictor:{deep_predictor},horizon=0", f"predictor:{deep_predictor},horizon=two",
                 f"predictor:{deep_predictor},max_in_flight=0"):  # fmt: skip
        with pytest.raises(UsageError) as info:
            make_policy(spec)
        assert len(str(info.value).splitlines()) == 1


def test_refused_where_a_needed_signal_is_absent_with_a_horizon(tmp_path):
    trace = _deep(sequences=3)
    path = _train_small(trace, tmp_path / "needs.pt", needs=["tokens"], epochs=1)
    simulate(trace, CombinedPolicy(make_policy("lru"), PredictorPrefetch(path, horizon=3)), 4)
    without = synthetic_trace(sequences=1, layers=6, experts=8, top_k=2)  # no tokens
    with pytest.raises(CheckpointError, match="needs the tokens") as info:
        simulate(without, CombinedPolicy(make_policy("lru"), PredictorPrefetch(path, horizon=3)), 4)
    assert len(str(info.value).splitlines()) == 1


def test_chained_signal_is_the_hard_one_for_routed_experts_and_predict_ahead_starts_at_the_next_layer(
    deep_predictor,
):
    trace = _deep()
    train, held = Trace(trace.meta, trace.sequences[:4]), Trace(trace.meta, trace.sequences[4:])
    spec = model_spec(trace.meta)
    features = PredictionFeatures(spec, build_tables(train))
    prefetcher = PredictorPrefetch(deep_predictor)
    scorer = prefetcher.scorer
    checked = 0
    for event in decode_events(held.sequences[0], None):
        features.update(event)
        if event.prefill or event.step < 2 or event.layer + 1 >= spec.num_layers:
            continue
        m = event.layer + 1
        given = np.zeros(spec.num_experts)
        given[list(event.experts)] = 1.0
        hard = features.base.layer_rows(m, features._no_cache)[:, FEATURES.index("coactivation")]
        np.testing.assert_allclose(soft_coactivation(features.base, m, given), hard, atol=1e-12)
        np.testing.assert_allclose(features.rows(m, given), features.rows(m), atol=1e-12)
        ahead = predict_ahead(features, scorer, event.layer, 3)
        assert [target for target, _ in ahead] == list(range(m, min(m + 3, spec.num_layers)))
        np.testing.assert_allclose(ahead[0][1], 1.0 / (1.0 + np.exp(-scorer(features.rows(m)))))
        checked += 1
    assert checked > 10


def test_ahead_quality_per_distance_on_held_out_prompts(deep_predictor):
    trace = _deep()
    train, held = Trace(trace.meta, trace.sequences[:4]), Trace(trace.meta, trace.sequences[4:])
    quality = ahead_quality(held, build_tables(train), PredictorPrefetch(deep_predictor).scorer, 3)
    assert set(quality) == {1, 2, 3}
    for d, row in quality.items():
        assert row["cells"] > 0
        for name in ("predictor", "previous_token", "inter_layer_chained", "token_table"):
            assert 0.0 <= row[name] <= 1.0, (d, name)
    assert quality[1]["predictor"] > 2 / 8 + 0.1  # well above chance (2 of 8) one layer ahead


def _predictor_script():
    return load_script("train/predictor.py")


def test_calibrate_only_chooses_threshold_horizon_and_budget_into_a_copy(deep_predictor, tmp_path, capsys):
    from moe_env.agents.checkpoint import load_checkpoint
    from moe_env.agents.prefetch_predictor import HORIZONS, IN_FLIGHT, KIND

    from moe_env.trace import save_trace

    trace_file = save_trace(_deep(sequences=5), tmp_path / "t.npz")
    before = deep_predictor.read_bytes()
    out = tmp_path / "calibrated.pt"
    args = ["--traces", f"{trace_file}#1-3", "--validation-traces", f"{trace_file}#0", "--eval-traces",
            f"{trace_file}#4", "--calibrate", str(deep_predictor), "--out", str(out), "--thresholds", "0.3,0.6",
            "--capacity", "4"]  # fmt: skip
    script = _predictor_script()
    assert script.main(args) == 0
    assert deep_predictor.read_bytes() == before  # the source is left as it was
    config = load_checkpoint(out, KIND).config
    table = config["calibration_ms_per_token"]
    assert len(table) == 2 + len(HORIZONS) * len(IN_FLIGHT) - 1
    assert config["horizon"] in HORIZONS and config["max_in_flight"] in IN_FLIGHT
    assert config["threshold"] in (0.3, 0.6)
    chosen = f"threshold={config['threshold']},horizon={config['horizon']},max_in_flight={config['max_in_flight']}"
    assert table[chosen] == pytest.approx(1e3 * config["calibrated_stall_s_per_token"])
    same = [v for k, v in table.items() if k.startswith(f"threshold={config['threshold']},")]
    assert table[chosen] == pytest.approx(min(same))
    loaded = PredictorPrefetch(out)  # the plug-in takes the calibrated setting
    assert loaded.horizon_setting == config["horizon"] and loaded.max_in_flight == config["max_in_flight"]
    capsys.readouterr()
    assert script.main([*args[:-4], "--thresholds", "0.3,7"]) == 2
    assert script.main([a for a in args if a not in ("--out", str(out))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--thresholds" in err[0] and "--calibrate needs --out" in err[1]
