"""The imitation scorer in one pool shared by every layer: Belady's shared-pool labels, cross-layer scores that
equal the features' own rows, the checkpoint's "decisions" field (shared runs, per-layer refused, corrupt refused)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from moe_env.agents.checkpoint import load_checkpoint, save_checkpoint
from moe_env.agents.imitation import ImitationConfig, ScorerEviction, collect, save_imitation
from moe_env.agents.set_scorer import NumpyScorer, fit_scorer
from moe_env.agents.shared_imitation import SharedDecisionCollector
from script_modules import load_script
from test_env import synthetic_trace

from moe_env.allocation import Allocation
from moe_env.errors import CheckpointError, UsageError
from moe_env.policy import make_policy
from moe_env.sim import Replayer, cost_model_for, simulate
from moe_env.trace import Trace, save_trace

TOTAL = 7  # slots of the one pool: 3 layers x 8 experts, top-2


@pytest.fixture(scope="module")
def trace() -> Trace:
    base = synthetic_trace(sequences=3, steps=30, layers=3, experts=8, top_k=2)
    tokens = [replace(s, output_ids=(np.arange(s.num_steps + 1) % 5).astype(np.int32)) for s in base.sequences]
    return Trace(base.meta, tokens)


def pool(trace: Trace, total: int = TOTAL) -> Allocation:
    return Allocation.one_pool(trace.meta.num_layers, trace.meta.num_experts, total)


def next_access_clocks(trace: Trace) -> list[dict[tuple[int, int], list[int]]]:
    """Per sequence, the cache clocks at which each (layer, expert) is accessed: one tick per access in route
    order (prefill layer by layer in ascending expert chunks of the pool's size, then decode in router order)."""
    out = []
    for sequence in trace.sequences:
        uses: dict[tuple[int, int], list[int]] = {}
        clock = 0
        for routing in sequence.routings():
            experts = sorted(set(routing.experts.reshape(-1).tolist())) if routing.step < 0 else routing.experts
            for expert in np.asarray(experts).reshape(-1).tolist():
                clock += 1
                uses.setdefault((routing.layer, int(expert)), []).append(clock)
        out.append(uses)
    return out


class Tap(SharedDecisionCollector):
    """The collector in Belady mode, noting every (clock, layer, candidates) the cache asks about."""

    def eviction_scores(self, layer, candidates, cache):
        self.noted.append((self.sequence, cache.clock, layer, candidates.tolist()))
        return super().eviction_scores(layer, candidates, cache)


def test_shared_labels_are_beladys_choice_across_layers(trace):
    """One decision per eviction (the per-layer calls grouped by clock): its rows are every layer's candidates and
    its labels the ones whose next use is farthest on the one clock (brute force on the trace); following the
    labels gives exactly Belady's shared-pool hits."""
    tap = Tap("belady", keep=1.0)
    tap.noted = []
    replayer = Replayer(trace.meta, tap, pool(trace), cost_model_for(trace.meta, None))
    for index, sequence in enumerate(trace.sequences):
        tap.sequence = index
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            replayer.process(routing)
    assert replayer.finish().hits == simulate(trace, "belady", pool(trace)).hits
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for index, clock, layer, candidates in tap.noted:
        groups.setdefault((index, clock), []).extend((layer, e) for e in candidates)
    groups = {key: c for key, c in groups.items() if len(c) > 1}
    decisions = tap.decisions_recorded()
    assert decisions.size == len(groups) > 30
    layers_per_decision = []
    uses = next_access_clocks(trace)
    for d, ((index, clock), candidates) in enumerate(groups.items()):
        future = [next((c for c in uses[index].get(key, []) if c > clock), np.inf) for key in candidates]
        labels = decisions.target[decisions.offsets[d] : decisions.offsets[d + 1]]
        np.testing.assert_array_equal(labels, np.array(future) == max(future))
        layers_per_decision.append(len({layer for layer, _ in candidates}))
    assert max(layers_per_decision) > 1  # decisions do span layers


class Checked(ScorerEviction):
    """A cross-layer scorer that checks its rows against the features' freshly built ones at every eviction (equal
    bit for bit; the scores to rounding: one batched call against one per layer)."""

    def eviction_scores(self, layer, candidates, cache):
        scores = super().eviction_scores(layer, candidates, cache)
        rows = self.features.rows(layer, candidates, cache)
        np.testing.assert_array_equal(self._across.rows(layer, candidates, cache), rows)
        np.testing.assert_allclose(scores, self.scorer(rows), rtol=1e-12, atol=1e-12)
        self.checked += len(candidates)
        return scores


@pytest.fixture(scope="module")
def shared_checkpoint(trace, tmp_path_factory):
    data, _ = collect(trace, [TOTAL, 10], "lru", None, 0.0, 3000, None, seed=0, shared=True)
    net = fit_scorer(data, hidden=16, epochs=5, lr=1e-2, batch=64, seed=0)
    path = tmp_path_factory.mktemp("shared") / "imitation-shared.pt"
    save_imitation(net, ImitationConfig(hidden=16, allocation="shared"), ["synthetic"], path, {"needs": []})
    return path, net


@pytest.mark.parametrize("warm", [False, True])
def test_cross_layer_scores_equal_the_features_rows(trace, shared_checkpoint, warm):
    """The shared pool's incremental rows (rebuilt per layer only when their inputs changed) score exactly as the
    features' own rows at every eviction, cold and warm, with prefill, tokens and lookahead in the trace."""
    _, net = shared_checkpoint
    policy = Checked(NumpyScorer(net), None, across_layers=True)
    policy.checked = 0
    result = simulate(trace, policy, pool(trace), warm=warm)
    assert policy.checked > 100 and result.hits > 0


def test_shared_checkpoint_runs_in_a_shared_pool_and_keeps_the_invariants(trace, shared_checkpoint, tmp_path,
                                                                          capsys):  # fmt: skip
    """Trained on shared decisions: ranks across layers (from the checkpoint), runs under bench --allocation
    shared, and the pool never exceeds its slots nor evicts an expert the event needs."""
    from moe_env.cli import main
    from moe_env.routing import route_events

    path, _ = shared_checkpoint
    assert load_checkpoint(path, "imitation").config["decisions"] == ["shared"]
    spec = f"imitation:{path},tables=none"
    policy = make_policy(spec)
    assert policy.ranks_across_layers
    replayer = Replayer(trace.meta, policy, pool(trace), cost_model_for(trace.meta, None))
    cache = replayer.cache
    for sequence in trace.sequences:
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            for event in route_events(routing, cache):
                plan = cache.route(event)
                resident = sum(len(cache.resident(layer)) for layer in range(trace.meta.num_layers))
                assert resident <= TOTAL
                assert all(cache.is_resident(event.layer, e) for e in event.experts)
                assert not any(load.evicted_layer == event.layer and load.evicted in event.experts
                               for load in plan.loads)  # fmt: skip
    counters = cache.counters
    assert counters.hits + counters.misses == sum(int((s.experts >= 0).sum()) for s in trace.sequences)
    data = save_trace(trace, tmp_path / "t.npz")
    argv = ["bench", "--trace", str(data), "--policies", f"lru,{spec}", "--cache-budget", str(TOTAL),
            "--allocation", "uniform,shared", "--reference-budget", "none", "--json"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    shared = [r for r in rows if r["allocation"] == "shared" and r["policy"] == spec]
    assert len(shared) == 1 and 0 < shared[0]["hit_rate"] < 1


def test_a_per_layer_checkpoint_is_refused_in_a_shared_pool(trace, shared_checkpoint, tmp_path):
    """A checkpoint trained on per-layer decisions, or one from before the field existed, is refused by the
    shared pool in one line; it still runs per layer."""
    path, _ = shared_checkpoint
    ckpt = load_checkpoint(path, "imitation")
    ckpt.config["decisions"] = ["per-layer"]
    per_layer = save_checkpoint(ckpt, tmp_path / "per-layer.pt")
    del ckpt.config["decisions"]
    old = save_checkpoint(ckpt, tmp_path / "old.pt")
    for saved in (per_layer, old):
        spec = f"imitation:{saved},tables=none"
        assert not make_policy(spec).ranks_across_layers
        with pytest.raises(UsageError, match="does not rank victims across layers") as raised:
            simulate(trace, spec, pool(trace))
        assert "\n" not in str(raised.value)
        assert simulate(trace, spec, 4).hit_rate > 0


@pytest.mark.parametrize("corrupt", [["shared", "shared"], "shared", [], ["shared", 3], ["everything"], None])
def test_a_corrupt_decisions_field_is_refused_in_one_line(shared_checkpoint, tmp_path, corrupt, capsys):
    from moe_env.cli import main

    path, _ = shared_checkpoint
    ckpt = load_checkpoint(path, "imitation")
    ckpt.config["decisions"] = corrupt
    bad = save_checkpoint(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="field 'decisions'") as raised:
        make_policy(f"imitation:{bad}")
    assert "\n" not in str(raised.value)
    argv = ["bench", "--trace", "builtin:tiny-mixtral/eval#0", "--policies", f"imitation:{bad}", "--cache-budget",
            "16", "--allocation", "shared", "--reference-budget", "none"]  # fmt: skip
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "decisions" in err


def test_train_script_trains_on_shared_decisions(trace, tmp_path):
    """With "allocation": "shared" in the config the run's checkpoint records shared decisions, validation is scored
    in the shared pool, and the checkpoint ranks across layers through the registry."""
    script = load_script("train/imitation.py")
    data = save_trace(trace, tmp_path / "t.npz")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"rounds": 1, "epochs": 1, "hidden": 8, "max_decisions_per_round": 300,
                                  "capacities": [3], "allocation": "shared"}))  # fmt: skip
    run = tmp_path / "run"
    argv = ["--config", str(config), "--traces", f"{data}#0,1", "--validation", f"{data}#2", "--run-dir", str(run)]
    assert script.main(argv) == 0
    best = load_checkpoint(run / "best.pt", "imitation")
    assert best.config["decisions"] == ["shared"] and best.config["allocation"] == "shared"
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["rounds"][0]["validation_hit_rate"]) == ["shared-9"]  # 3 layers x 3 slots
    assert make_policy(f"imitation:{run / 'best.pt'}").ranks_across_layers
    with pytest.raises(UsageError, match="allocation"):
        ImitationConfig.from_dict({"allocation": "pooled"})


def test_the_shipped_shared_checkpoint_runs_under_every_allocation():
    """`imitation-shared` (the shipped checkpoint) ranks across layers, needs no signal (trained with signal
    dropout), and runs in a shared pool and per layer on shapes it was not trained on."""
    policy = make_policy("imitation-shared")
    assert policy.ranks_across_layers and policy.needs == []
    assert "shared" in load_checkpoint(policy.path, "imitation").config["decisions"]  # shared, or both kinds
    for spec in ("builtin:tiny-mixtral/eval#0", "builtin:tiny-olmoe/eval#0"):
        from moe_env.trace import load_trace

        target = load_trace(spec)
        meta = target.meta
        for layout in (pool(target, meta.num_layers * (meta.top_k + 2)), meta.top_k + 2):
            result = simulate(target, "imitation-shared", layout)
            lru = simulate(target, "lru", layout)
            assert result.hits + result.misses == lru.hits + lru.misses and 0 < result.hit_rate < 1
