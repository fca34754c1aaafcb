"""The imitation policy: Belady labels, one checkpoint on three shapes, refusal of a missing signal, causality."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from moe_env.agents.candidate_features import FEATURES, HIDEABLE, CandidateFeatures
from moe_env.agents.imitation import (
    DecisionCollector,
    ImitationConfig,
    ImitationPolicy,
    capacities_for,
    collect,
    needed_signals,
    save_imitation,
)
from moe_env.agents.model_tables import build_tables, load_tables, save_tables
from moe_env.agents.set_scorer import CLIP, Decisions, NumpyScorer, SetScorerNet, agreement, fit_scorer
from script_modules import load_script
from test_env import synthetic_trace

from moe_env.cache import ExpertCacheState
from moe_env.errors import CheckpointError
from moe_env.policy import make_policy
from moe_env.routing import route_events
from moe_env.sim import Replayer, cost_model_for, model_spec, simulate
from moe_env.trace import SequenceTrace, Trace, TraceMeta, load_trace


def next_access(sequence: SequenceTrace, layer: int, step: int, expert: int) -> float:
    """Position (in this layer's decode accesses) of `expert`'s next use after step `step`; inf if never."""
    k = sequence.experts.shape[2]
    for t in range(step + 1, sequence.num_steps):
        row = sequence.experts[t, layer].tolist()
        if expert in row:
            return float(t * k + row.index(expert))
    return math.inf


class Tap(DecisionCollector):
    """The collector in Belady mode, also noting the step, layer and candidates of every eviction it labels."""

    def observe(self, event, cache):
        self.step_now = event.step
        super().observe(event, cache)

    def eviction_scores(self, layer, candidates, cache):
        if len(candidates) > 1:
            self.noted.append((self.sequence, self.step_now, layer, candidates.tolist()))
        return super().eviction_scores(layer, candidates, cache)


@pytest.fixture(scope="module")
def trace() -> Trace:
    base = synthetic_trace(sequences=3, steps=30, layers=3, experts=8, top_k=2)
    return Trace(base.meta, [replace(s, prefill_experts=None) for s in base.sequences])


def test_imitation_labels_are_belady_choices(trace):
    """Labels = the candidates whose next use is the farthest (brute force on the trace); following them gives
    exactly Belady's hits."""
    capacity = 4
    tap = Tap("belady", keep=1.0)
    tap.noted = []
    replayer = Replayer(trace.meta, tap, capacity, cost_model_for(trace.meta, None))
    for index, sequence in enumerate(trace.sequences):
        tap.sequence = index
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            replayer.process(routing)
    followed = replayer.finish()
    assert followed.hits == simulate(trace, "belady", capacity).hits
    decisions = tap.decisions_recorded()
    assert decisions.size == len(tap.noted) > 20
    for d, (index, step, layer, candidates) in enumerate(tap.noted):
        distance = np.array([next_access(trace.sequences[index], layer, step, e) for e in candidates])
        labels = decisions.target[decisions.offsets[d] : decisions.offsets[d + 1]]
        np.testing.assert_array_equal(labels, distance == distance.max())


def test_listwise_training_learns_belady_better_than_lru(trace):
    config = ImitationConfig(capacities=[3, 4], max_decisions_per_round=4000)
    data, _ = collect(trace, [3, 4], "belady", None, 0.0, 4000, None, seed=0)
    net = fit_scorer(data, hidden=16, epochs=30, lr=1e-2, batch=64, seed=0)
    learned = agreement(NumpyScorer(net), data)
    recency = data.rows[:, FEATURES.index("recency")]
    bounds = zip(data.offsets[:-1], data.offsets[1:], strict=True)
    lru_agree = np.mean([data.target[lo + int(np.argmax(recency[lo:hi]))] for lo, hi in bounds])
    assert learned > lru_agree + 0.05, (learned, lru_agree)
    assert config.capacities == [3, 4]


@pytest.fixture(scope="module")
def checkpoint(trace, tmp_path_factory):
    data, _ = collect(trace, [3, 4], "belady", None, 0.0, 3000, None, seed=1)
    net = fit_scorer(data, hidden=16, epochs=5, lr=1e-2, batch=64, seed=0)
    path = tmp_path_factory.mktemp("imitation") / "imitation.pt"
    save_imitation(net, ImitationConfig(hidden=16), ["synthetic"], path, {"needs": []})
    return path


def no_signals(trace: Trace) -> Trace:
    """The trace without gate weights, gate logits and lookahead logits (as a converted log)."""
    seqs = [replace(s, weights=None, gate_logits=None, lookahead_logits=None) for s in trace.sequences]
    return Trace(trace.meta, seqs)


def test_one_checkpoint_runs_on_three_shapes(checkpoint, trace):
    shapes = set()
    for target in (trace, load_trace("builtin:tiny-mixtral/eval#0,1"), load_trace("builtin:tiny-olmoe/eval#0,1")):
        meta = target.meta
        shapes.add((meta.num_layers, meta.num_experts, meta.top_k))
        capacity = meta.top_k + 2
        result = simulate(target, f"imitation:{checkpoint},tables=none", capacity)
        lru = simulate(target, "lru", capacity)
        assert result.hits + result.misses == lru.hits + lru.misses
        assert 0.0 < result.hit_rate < 1.0
    assert len(shapes) == 3


def test_missing_signal_refused_by_name(trace, checkpoint, tmp_path):
    """A checkpoint that never saw gate logits missing in training needs them: refused by name where absent."""
    from moe_env.agents.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint, "imitation")
    ckpt.config["needs"] = ["gate logits"]
    needy = save_checkpoint(ckpt, tmp_path / "needy.pt")
    assert simulate(trace, f"imitation:{needy}", 4).hit_rate > 0  # present: runs
    with pytest.raises(CheckpointError, match="gate logits") as info:
        simulate(no_signals(trace), f"imitation:{needy}", 4)
    assert "\n" not in str(info.value)
    # the plain checkpoint runs without those signals (their "missing" indicators are features)
    assert simulate(no_signals(trace), f"imitation:{checkpoint}", 4).hit_rate > 0


def test_features_are_causal(trace):
    """Rows at step t do not depend on routing after t: two traces equal up to t give equal rows."""
    meta = trace.meta
    spec = model_spec(meta)
    seq = trace.sequences[0]
    cut = 12
    other = seq.experts.copy()
    other[cut + 1 :] = np.roll(other[cut + 1 :], 3, axis=0)
    rows = []
    for experts in (seq.experts, other):
        features = CandidateFeatures(spec, 4)
        cache = ExpertCacheState(spec, 4, make_policy("lru"))
        variant = replace(seq, experts=experts, prefill_experts=None)
        out = None
        for routing in variant.routings():
            for event in route_events(routing, 4):
                features.update(event, cache.clock)
                cache.route(event)
                if event.step == cut and event.layer == 1:
                    out = features.rows(1, np.arange(meta.num_experts), cache)
        rows.append(out)
    np.testing.assert_array_equal(rows[0], rows[1])


def test_model_tables_round_trip_and_corruption(tmp_path):
    base = load_trace("builtin:tiny-mixtral/train")
    tables = build_tables(base)
    assert len(tables.token_keys) > 0  # the recorded traces carry their tokens
    path = save_tables(tables, tmp_path / "t.npz")
    back = load_tables(path)
    np.testing.assert_allclose(back.popularity, tables.popularity)
    assert back.transition.sum() > 0 and back.coactivation.sum() > 0
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken = tmp_path / "broken.npz"
    broken.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_tables(broken)
    other = TraceMeta("x", 5, 8, 2, "test")
    with pytest.raises(CheckpointError, match="layers, experts, top-k"):
        load_tables(path, model_spec(other))


def test_shipped_imitation_policy_runs_everywhere():
    """The shipped checkpoint was trained with signal dropout, so it needs no signal: it runs with and without
    tokens, gate weights and logits (a trace lacking them is not refused)."""
    policy = ImitationPolicy()
    assert policy.needs == [] and policy.ckpt.config["signal_dropout"] > 0
    for spec in ("builtin:tiny-mixtral/eval#0,1", "builtin:tiny-olmoe/eval#0,1", "tokenless"):
        if spec == "tokenless":
            base = load_trace("builtin:tiny-mixtral/eval#0,1")
            target = no_signals(Trace(base.meta, [replace(s, output_ids=None) for s in base.sequences]))
        else:
            target = load_trace(spec)
        capacity = target.meta.top_k + 2
        result = simulate(target, policy, capacity)
        assert (
            result.hits + result.misses
            == simulate(target, "lru", capacity).hits + simulate(target, "lru", capacity).misses
        )


def test_train_script_runs_resumes_and_refuses_bad_input(trace, tmp_path, capsys):
    import json

    from moe_env.trace import save_trace

    script = load_script("train/imitation.py")
    data = save_trace(trace, tmp_path / "t.npz")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"rounds": 1, "epochs": 1, "hidden": 8, "max_decisions_per_round": 500}))
    run = tmp_path / "run"
    common = ["--traces", f"{data}#0,1", "--validation", f"{data}#2", "--run-dir", str(run)]
    assert script.main(["--config", str(config), *common]) == 0
    for name in ("config.json", "command.txt", "log.txt", "round-0.pt", "best.pt", "pool.npz", "tables-0.npz"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    assert script.main(["--run-dir", str(run), "--resume", "--rounds", "2", *common[:4]]) == 0
    assert (run / "round-1.pt").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["rounds"][1]["behaviour"] == "learner"
    # best.pt stays the best round's across a resume; --config with --resume extends the run with its settings
    extended = tmp_path / "more.json"
    extended.write_text(json.dumps({"rounds": 3, "epochs": 1, "hidden": 8, "max_decisions_per_round": 500,
                                    "beta_schedule": [1.0, 0.0]}))  # fmt: skip
    assert script.main(["--run-dir", str(run), "--resume", "--config", str(extended), *common[:4]]) == 0
    assert json.loads((run / "config.json").read_text())["beta_schedule"] == [1.0, 0.0]
    assert json.loads((run / "config-before-resume-1.json").read_text())["beta_schedule"] is None
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    best = max(summary["rounds"], key=lambda r: r["mean_gap"])["round"]
    assert summary["best_round"] == best, [r["mean_gap"] for r in summary["rounds"]]
    assert (run / "best.pt").read_bytes() == (run / f"round-{best}.pt").read_bytes()
    assert simulate(trace, f"imitation:{run / 'best.pt'},tables={run / 'tables-0.npz'}", 3).hit_rate > 0
    capsys.readouterr()
    wider = tmp_path / "wider.json"  # a resumed run may not change what its saved rounds were made of
    wider.write_text(json.dumps({"rounds": 4, "epochs": 1, "hidden": 16, "max_decisions_per_round": 500}))
    assert script.main(["--run-dir", str(run), "--resume", "--config", str(wider), *common[:4]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hidden" in err[0] and "start a new run" in err[0], err
    assert json.loads((run / "config.json").read_text())["hidden"] == 8
    assert script.main(["--config", str(tmp_path / "missing.json"), *common[:4], "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read config" in err[0]


def with_tokens(trace: Trace) -> Trace:
    """The trace with a deterministic input token per step (a token id that predicts nothing)."""
    seqs = [replace(s, output_ids=(np.arange(s.num_steps + 1) % 5).astype(np.int32)) for s in trace.sequences]
    return Trace(trace.meta, seqs)


def feature_rows(trace: Trace, capacity: int, hidden=()) -> list[np.ndarray]:
    spec = model_spec(trace.meta)
    features = CandidateFeatures(spec, capacity)
    cache = ExpertCacheState(spec, capacity, make_policy("lru"))
    out = []
    for sequence in trace.sequences:
        cache.begin_sequence()
        features.begin_sequence(hidden)
        for routing in sequence.routings():
            for event in route_events(routing, capacity):
                features.update(event, cache.clock)
                out.append(features.layer_rows(event.layer, cache).copy())
                cache.route(event)
    return out


def test_hidden_signals_give_the_rows_of_a_trace_without_them(trace):
    """Signal dropout: hiding every signal gives exactly the rows of the trace that lacks them, "missing" set."""
    full = with_tokens(trace)
    bare = no_signals(Trace(trace.meta, [replace(s, output_ids=None) for s in trace.sequences]))
    hidden, absent, shown = feature_rows(full, 4, HIDEABLE), feature_rows(bare, 4), feature_rows(full, 4)
    assert len(hidden) == len(absent) > 50
    for a, b in zip(hidden, absent, strict=True):
        np.testing.assert_array_equal(a, b)
    for column in ("token_missing", "gate_missing", "weight_missing"):
        index = FEATURES.index(column)
        assert all(r[:, index].min() == 1.0 for r in hidden[1:])
        assert any(r[:, index].max() == 0.0 for r in shown)
    with pytest.raises(ValueError, match="hideable"):
        CandidateFeatures(model_spec(trace.meta), 4).begin_sequence(["colour"])


def test_signal_dropout_trains_without_needs_and_splits_off_tableless_sequences(trace):
    """With dropout the "missing" indicators fire in training, so the checkpoint needs no signal; without it a
    trace that always has gate logits yields a checkpoint that needs them."""
    tables = build_tables(trace)
    plain, _ = collect(trace, [3, 4], "lru", None, 0.0, 3000, tables, seed=0)
    dropped, _ = collect(trace, [3, 4], "lru", None, 0.0, 3000, tables, seed=0, signal_dropout=0.5,
                         no_tables_share=0.34)  # fmt: skip
    assert "gate logits" in needed_signals(plain) and "gate weights" in needed_signals(plain)
    assert needed_signals(dropped) == []
    assert dropped.size == plain.size  # the same replays, split by sequence; nothing lost
    assert not np.array_equal(dropped.rows, plain.rows)


def test_scorer_ignores_columns_constant_in_training_and_bounds_outliers():
    """A column constant in training (a signal never present there) cannot move a score where it varies; an
    outlier far outside the training range moves it by a bounded amount."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(600, 3)).astype(np.float32)
    rows[:, 2] = 1.0  # constant: like weight_missing on a trace without gate weights
    target = np.zeros(600, dtype=bool)
    offsets = np.arange(0, 601, 6)
    for lo in offsets[:-1]:
        target[lo + int(np.argmin(rows[lo : lo + 6, 0]))] = True
    net = fit_scorer(Decisions(rows, target, offsets), hidden=8, epochs=3, lr=1e-2, batch=32, seed=0)
    scorer = NumpyScorer(net)
    probe = rows[:6].astype(np.float64)
    moved = probe.copy()
    moved[:, 2] = 0.0
    np.testing.assert_allclose(scorer(moved), scorer(probe), atol=1e-4)
    far, farther = probe.copy(), probe.copy()
    far[:, 1] = CLIP * float(net.std[1]) + float(net.mean[1])
    farther[:, 1] = 1e9
    np.testing.assert_allclose(scorer(farther), scorer(far), rtol=1e-5)


def test_budgets_per_model_width():
    config = ImitationConfig(capacities=[8, 16, 32], capacities_by_experts={"8": [3, 4, 5]})
    mixtral = Trace(TraceMeta(model="m", num_layers=2, num_experts=8, top_k=2, source="test"), [])
    wide = Trace(TraceMeta(model="w", num_layers=2, num_experts=64, top_k=6, source="test"), [])
    assert capacities_for(mixtral, config) == [3, 4, 5]
    assert capacities_for(wide, config) == [8, 16, 32]


def narrow_checkpoint(data: Decisions, columns: list[str], path: Path) -> tuple[SetScorerNet, Path]:
    """A scorer fit on the named columns only, saved as a checkpoint trained before the others existed."""
    from moe_env.agents.checkpoint import load_checkpoint, save_checkpoint

    index = [FEATURES.index(name) for name in columns]
    net = fit_scorer(Decisions(data.rows[:, index], data.target, data.offsets), hidden=8, epochs=2, lr=1e-2,
                     batch=64, seed=0)  # fmt: skip
    save_imitation(net, ImitationConfig(hidden=8), ["synthetic"], path, {"needs": []})
    ckpt = load_checkpoint(path, "imitation")
    ckpt.config["features"] = columns
    ckpt.obs_size = len(columns)
    return net, save_checkpoint(ckpt, path)


def test_checkpoint_of_fewer_columns_loads_and_scores_as_trained(trace, tmp_path):
    """A checkpoint trained before columns were added (its features a subset of ours) scores our wider rows
    exactly as it scored its own; one naming a column we do not compute is refused with one line."""
    from moe_env.agents.checkpoint import load_checkpoint, save_checkpoint
    from moe_env.agents.imitation import load_scorer_net

    data, _ = collect(trace, [3, 4], "lru", None, 0.0, 2000, None, seed=0)
    old = list(FEATURES[: FEATURES.index("seq_tokens")])  # the columns of the first shipped checkpoints
    columns = [FEATURES.index(name) for name in old]
    narrow, path = narrow_checkpoint(data, old, tmp_path / "old.pt")
    ckpt = load_checkpoint(path, "imitation")
    wide = load_scorer_net(load_checkpoint(path, "imitation"), str(path))
    assert isinstance(wide, SetScorerNet) and wide.mean.shape == (len(FEATURES),)
    rows = data.rows[:200].astype(np.float64)
    shuffled = rows.copy()
    shuffled[:, len(old) :] = np.random.default_rng(0).normal(size=(200, len(FEATURES) - len(old))) * 100
    expected = NumpyScorer(narrow)(rows[:, columns])
    np.testing.assert_allclose(NumpyScorer(wide)(shuffled), expected, rtol=1e-9, atol=1e-9)
    assert simulate(trace, f"imitation:{path},tables=none", 4).hit_rate > 0
    ckpt.config["features"] = [*old[:-1], "colour"]
    foreign = save_checkpoint(ckpt, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="trained on features") as info:
        ImitationPolicy(foreign)
    assert "\n" not in str(info.value)


def test_long_window_and_transition_mixture_features(trace):
    """decay_long and seq_tokens follow their definitions; transition_mix is 0 before a use and favours the
    experts that followed the layer's recent experts in the transition statistics."""
    spec = model_spec(trace.meta)
    features = CandidateFeatures(spec, 4)
    cache = ExpertCacheState(spec, 4, make_policy("lru"))
    first = features.layer_rows(0, cache)
    assert (first[:, FEATURES.index("transition_mix")] == 0).all()
    seq = trace.sequences[0]
    long = np.zeros(spec.num_experts)
    steps = 0
    for routing in seq.routings():
        for event in route_events(routing, 4):
            features.update(event, cache.clock)
            cache.route(event)
            if event.layer == 0 and not event.prefill:
                long *= 0.98
                long[list(event.experts)] += 1
                steps += 1
    rows = features.layer_rows(0, cache)
    np.testing.assert_allclose(rows[:, FEATURES.index("decay_long")], long * 0.02)
    assert rows[0, FEATURES.index("seq_tokens")] == pytest.approx(math.log1p(steps) / math.log(257.0))
    # transitions of layer 0 always lead to expert 5: it gets the highest mixture score
    features.transition[0] = 0.0
    features.transition[0, :, 5] = 50.0
    features._version += 1
    mix = features.layer_rows(0, cache)[:, FEATURES.index("transition_mix")]
    assert int(np.argmax(mix)) == 5 and mix[5] > 0 > mix[0]


def test_regret_weights_and_weighted_listwise_loss():
    """A decision whose candidates are all as good as Belady's weighs the floor; one where the others are needed
    at once weighs near 1; the weighted loss is the weighted mean of the per-decision losses."""
    import torch
    from moe_env.agents.set_scorer import listwise_loss, regret_weights

    distance = np.array([np.inf, np.inf, np.inf, np.inf, 1.0, 1.0])
    seg = np.array([0, 0, 0, 1, 1, 1])
    weights = regret_weights(distance, seg, 2, horizon=1e4)
    assert weights[0] == pytest.approx(0.05)
    assert weights[1] == pytest.approx(2 / 3 * (1 - math.log(2) / math.log1p(1e4)))
    scores = torch.tensor([0.3, -0.2, 0.5, 1.0, -1.0, 0.0])
    target = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    segment = torch.from_numpy(seg)
    one = torch.zeros(3, dtype=torch.long)
    each = [float(listwise_loss(scores[s], target[s], one, 1)) for s in (slice(0, 3), slice(3, 6))]
    w = torch.tensor([1.0, 3.0])
    expected = (each[0] * 1 + each[1] * 3) / 4
    assert float(listwise_loss(scores, target, segment, 2, weight=w)) == pytest.approx(expected, rel=1e-6)
    assert float(listwise_loss(scores, target, segment, 2)) == pytest.approx(sum(each) / 2, rel=1e-6)


def test_reuse_history_columns_on_a_hand_checked_trace():
    """gap_1..gap_4, gap_mean, overdue and decay_vlong on one layer of 4 experts: expert 0 used at steps 0, 1, 3,
    6, 10 and 11 (gaps newest first 1, 4, 3, 2; the oldest gap, 1, falls out of the four kept); expert 1 once at
    step 2 (no gap); expert 2 at steps 4 and 8 (one gap of 4); expert 3 at steps 5, 7, 9 and 12. Rows at step 12."""
    from moe_env.agents.candidate_features import GAP_COLUMNS

    from moe_env.policy import ModelSpec, RouteEvent

    spec = ModelSpec(num_layers=1, num_experts=4, top_k=1)
    features = CandidateFeatures(spec, 2)
    cache = ExpertCacheState(spec, 2, make_policy("lru"))
    used = {0: 0, 1: 0, 2: 1, 3: 0, 4: 2, 5: 3, 6: 0, 7: 3, 8: 2, 9: 3, 10: 0, 11: 0, 12: 3}
    vlong = np.zeros(4)
    for step, expert in used.items():
        event = RouteEvent(step=step, layer=0, experts=(expert,))
        features.update(event, cache.clock)
        cache.route(event)
        vlong *= 0.995
        vlong[expert] += 1
    rows = features.layer_rows(0, cache)
    col = {name: FEATURES.index(name) for name in (*GAP_COLUMNS, "gap_mean", "overdue", "decay_vlong")}
    scale = 1 / math.log(257.0)
    gaps = [rows[:, col[name]] for name in GAP_COLUMNS]
    # expert 0: uses 11, 10, 6, 3, 1 kept (newest first): gaps 1, 4, 3, 2
    np.testing.assert_allclose([g[0] for g in gaps], np.log1p([1, 4, 3, 2]) * scale)
    assert rows[0, col["gap_mean"]] == pytest.approx(math.log1p(2.5) * scale)
    assert rows[0, col["overdue"]] == pytest.approx(math.log((12 - 11 + 1) / 3.5) * scale)
    # expert 1: a single use, no gap; expert 3: used at 5, 7, 9, 12 (gaps 3, 2, 2), the current step
    assert [g[1] for g in gaps] == [1.0] * 4 and rows[1, col["gap_mean"]] == 1.0 and rows[1, col["overdue"]] == 0
    np.testing.assert_allclose([g[3] for g in gaps], [*(np.log1p([3, 2, 2]) * scale), 1.0])
    assert rows[3, col["overdue"]] == pytest.approx(math.log(1 / (7 / 3 + 1)) * scale)
    # expert 2: one gap of 4, then 4 tokens since: exactly on habit
    np.testing.assert_allclose([g[2] for g in gaps], [math.log1p(4) * scale, 1.0, 1.0, 1.0])
    assert rows[2, col["overdue"]] == pytest.approx(math.log(5 / 5) * scale)
    np.testing.assert_allclose(rows[:, col["decay_vlong"]], vlong * 0.005)
    features.begin_sequence()
    fresh = features.layer_rows(0, cache)
    assert (fresh[:, col["gap_1"]] == 1.0).all() and (fresh[:, col["overdue"]] == 0).all()


def test_repeat_columns_on_a_hand_checked_trace():
    """repeat_*: input tokens 7 8 9 7 8 7 at steps 0-5, one layer routing expert = step. At step 4 (token 8) the
    earlier 8 is at step 1: steps 2, 3, 4 follow it (experts 2, 3, 4), and the tokens before (7 and 7) match; at
    step 5 (token 7) the latest earlier 7 is at step 3 (then expert 4, expert 5), tokens before 9 and 8 differ;
    at step 2 (token 9) there is no earlier 9; hiding the tokens hides the repeat."""
    from moe_env.policy import ModelSpec, RouteEvent

    spec = ModelSpec(num_layers=1, num_experts=6, top_k=1)
    features = CandidateFeatures(spec, 2)
    cache = ExpertCacheState(spec, 2, make_policy("lru"))
    col = {name: FEATURES.index(name) for name in ("repeat_next", "repeat_soon", "repeat_bigram", "repeat_missing")}
    seen = {}
    for step, token in enumerate([7, 8, 9, 7, 8, 7]):
        event = RouteEvent(step=step, layer=0, experts=(step,), extra={"token": token})
        features.update(event, cache.clock)
        cache.route(event)
        seen[step] = features.layer_rows(0, cache).copy()
    assert seen[2][:, col["repeat_missing"]].tolist() == [1.0] * 6 and not seen[2][:, col["repeat_soon"]].any()
    assert seen[4][:, col["repeat_next"]].tolist() == [0, 0, 1, 0, 0, 0]
    assert seen[4][:, col["repeat_soon"]].tolist() == [0, 0, 1.0, 0.5, 0.25, 0]
    assert seen[4][0, col["repeat_bigram"]] == 1.0 and seen[4][0, col["repeat_missing"]] == 0.0
    assert seen[5][:, col["repeat_next"]].tolist() == [0, 0, 0, 0, 1, 0]
    assert seen[5][:, col["repeat_soon"]].tolist() == [0, 0, 0, 0, 1.0, 0.5]
    assert seen[5][0, col["repeat_bigram"]] == 0.0
    features.begin_sequence(hidden=["tokens"])
    for step, token in enumerate([7, 7]):
        features.update(RouteEvent(step=step, layer=0, experts=(step,), extra={"token": token}), cache.clock)
    hidden = features.layer_rows(0, cache)
    assert (hidden[:, col["repeat_missing"]] == 1).all() and not hidden[:, col["repeat_soon"]].any()


def test_ignored_features_are_zeroed_in_training_and_unknown_names_refused(trace):
    """ignored_features: the scorer fit on the zeroed pool does not read those columns; a name we do not compute is
    refused in one line."""
    from moe_env.agents.imitation import without_columns

    from moe_env.errors import UsageError

    with pytest.raises(UsageError, match="ignored_features") as info:
        ImitationConfig.from_dict({"ignored_features": ["gap_1", "colour"]})
    assert "\n" not in str(info.value)
    assert ImitationConfig.from_dict({"ignored_features": ["gap_1"]}).ignored_features == ["gap_1"]
    data, _ = collect(trace, [3, 4], "lru", None, 0.0, 2000, None, seed=0)
    column = FEATURES.index("recency")
    zeroed = without_columns(data, ["recency"])
    assert (zeroed.rows[:, column] == 0).all() and data.rows[:, column].any()
    scorer = NumpyScorer(fit_scorer(zeroed, hidden=8, epochs=1, lr=1e-2, batch=64, seed=0))
    rows = data.rows[:100].astype(np.float64)
    moved = rows.copy()
    moved[:, column] += 5.0
    np.testing.assert_allclose(scorer(moved), scorer(rows), atol=1e-4)  # the ignored std scales it by 1e-6


def test_a_checkpoint_trained_before_the_history_columns_does_not_compute_them(trace, tmp_path):
    """A checkpoint that predates the reuse-history and repeat columns (as those shipped before f796349): its
    policy skips computing them and evicts exactly as with them computed (its widened scorer gives them zero
    weight)."""
    from moe_env.agents.imitation import replay

    data, _ = collect(trace, [3, 4], "lru", None, 0.0, 2000, None, seed=0)
    _, path = narrow_checkpoint(data, list(FEATURES[: FEATURES.index("gap_1")]), tmp_path / "before.pt")
    lean, full = ImitationPolicy(path, "none"), ImitationPolicy(path, "none")
    full.columns = None
    assert "gap_1" not in lean.columns
    lean_result, full_result = replay(trace, lean, 4), replay(trace, full, 4)
    assert not lean.features._history and not lean.features._repeats and full.features._history
    assert lean_result.hits == full_result.hits and lean_result.hit_rate == full_result.hit_rate


def test_beta_schedule_decays_the_oracle_share_of_dagger_rounds(trace, checkpoint):
    """beta_schedule: round r's learner states mix Belady's choices with share beta_r (the last entry for later
    rounds); beta 1 replays Belady's states, beta 0 the learner's own; a share outside [0, 1] is refused."""
    from moe_env.agents.imitation import RoundResult, ScorerEviction, dagger, load_checkpoint, load_scorer_net, replay

    from moe_env.errors import UsageError

    config = ImitationConfig.from_dict({"beta": 0.3, "beta_schedule": [0.5, 0.25, 0.0]})
    assert [config.beta_of(r) for r in (0, 1, 2, 3, 4)] == [0.5, 0.5, 0.25, 0.0, 0.0]
    assert ImitationConfig(beta=0.3).beta_of(2) == 0.3
    for bad in ([], [0.5, 1.5]):
        with pytest.raises(UsageError, match="beta_schedule"):
            ImitationConfig.from_dict({"beta_schedule": bad})
    scorer = NumpyScorer(load_scorer_net(load_checkpoint(checkpoint, "imitation"), "test"))
    learner = replay(trace, ScorerEviction(scorer, None), 3).hit_rate
    oracle = simulate(trace, "belady", 3).hit_rate
    assert learner < oracle
    for beta, expected in ((1.0, oracle), (0.0, learner)):
        collector = DecisionCollector("learner", scorer, beta=beta, keep=0.0)
        assert replay(trace, collector, 3).hit_rate == pytest.approx(expected, abs=1e-12)
    lines: list[str] = []
    run = replace(config, rounds=3, capacities=[3], max_decisions_per_round=300, hidden=8, epochs=1)
    dagger([(trace, None)], [], run, lambda net, r: RoundResult(r, "", 0, 0, math.nan), log=lines.append)
    rounds = [line.split(":")[0] for line in lines if "new decisions" in line]
    assert rounds == ["round 0 (lru states)", "round 1 (learner states, oracle share 0.5)",
                      "round 2 (learner states, oracle share 0.25)"]  # fmt: skip


def test_variants_fit_on_a_slice_of_the_pool(trace):
    """bench/imitation_variants.py "slice": one round's decisions of a run's pool, rows and offsets as in the pool."""
    slicer = load_script("bench/imitation_variants.py").decisions_slice
    pool, _ = collect(trace, [3, 4], "lru", None, 0.0, 400, None, seed=0)
    part = slicer(pool, 2, 5)
    assert part.size == 3 and part.offsets[0] == 0
    np.testing.assert_array_equal(part.rows, pool.rows[pool.offsets[2] : pool.offsets[5]])
    np.testing.assert_array_equal(part.target, pool.target[pool.offsets[2] : pool.offsets[5]])
    tail = slicer(pool, pool.size - 4, None)
    assert tail.size == 4 and tail.offsets[-1] == len(tail.rows)
    with pytest.raises(ValueError, match="selects no decisions"):
        slicer(pool, pool.size, None)


def test_rounds_replay_round_zeros_sequences_unless_resampled(trace):
    """resample_sequences False: every DAgger round replays round 0's draw of the training sequences."""
    from moe_env.agents.imitation import round_sequences

    wide = Trace(trace.meta, trace.sequences * 4)
    same = ImitationConfig(max_sequences=5, resample_sequences=False)
    fresh = ImitationConfig(max_sequences=5)
    drawn = {r: [id(s) for s in round_sequences(wide, same, r, 0).sequences] for r in (0, 1, 2)}
    assert drawn[0] == drawn[1] == drawn[2] and len(drawn[0]) == 5
    assert [id(s) for s in round_sequences(wide, fresh, 0, 0).sequences] == drawn[0]
    assert any([id(s) for s in round_sequences(wide, fresh, r, 0).sequences] != drawn[0] for r in (1, 2))


def test_learner_experts_limits_dagger_rounds_to_the_named_widths(trace, monkeypatch):
    """learner_experts: round 0 collects on every training trace, later rounds only on traces of the named widths
    (the others keep their round-0 decisions); a width no trace has is refused in one line."""
    import moe_env.agents.imitation as imitation

    from moe_env.errors import UsageError

    other = synthetic_trace(sequences=2, steps=20, layers=2, experts=6, top_k=2)
    seen: list[tuple[int, int]] = []  # (round, num_experts) of every collection
    real_collect = imitation.collect

    def spy(trace_, capacities, behaviour, *args, **kwargs):
        seen.append((0 if behaviour == "lru" else 1, trace_.meta.num_experts))
        return real_collect(trace_, capacities, behaviour, *args, **kwargs)

    monkeypatch.setattr(imitation, "collect", spy)
    config = ImitationConfig(rounds=2, capacities=[3], max_decisions_per_round=200, hidden=8, epochs=1,
                             beta_schedule=[0.0], learner_experts=[8])  # fmt: skip

    def run(traces, **changes):
        seen.clear()
        score = lambda net, r: imitation.RoundResult(r, "", 0, 0, math.nan)  # noqa: E731
        imitation.dagger(traces, [], replace(config, **changes), score, log=lambda line: None)
        return list(seen)

    assert run([(trace, None), (other, None)]) == [(0, 8), (0, 6), (1, 8)]
    assert run([(trace, None), (other, None)], learner_experts=None) == [(0, 8), (0, 6), (1, 8), (1, 6)]
    with pytest.raises(UsageError, match="learner_experts \\[64\\] names no training trace's width"):
        run([(trace, None)], learner_experts=[64])
