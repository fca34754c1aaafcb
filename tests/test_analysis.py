"""Trace statistics by hand, the analyze report, and its CLI errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from moe_env import analysis
from moe_env.cli import main
from moe_env.sim import simulate
from moe_env.trace import SequenceTrace, Trace, TraceMeta, load_trace, save_trace

SHARED_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mixtral-8x7b-gsm8k-routing.jsonl"


def chain_trace(steps: int = 60, layers: int = 3, experts: int = 4, seed: int = 0) -> Trace:
    """top-1 routing where layer l+1 routes (expert at l) + 1 mod E, perfect lookahead logits, weights."""
    rng = np.random.default_rng(seed)
    rows = np.empty((steps, layers, 1), dtype=np.int16)
    rows[:, 0, 0] = rng.integers(0, experts, steps)
    for layer in range(1, layers):
        rows[:, layer, 0] = (rows[:, layer - 1, 0] + 1) % experts
    lookahead = np.zeros((steps, layers, experts), dtype=np.float32)
    for layer in range(layers - 1):
        lookahead[np.arange(steps), layer, rows[:, layer + 1, 0]] = 4.0
    lookahead[:, -1] = np.nan
    weights = rng.uniform(0.3, 1.0, size=(steps, layers, 1)).astype(np.float32)
    seq = SequenceTrace(experts=rows, weights=weights, lookahead_logits=lookahead, split="eval")
    return Trace(TraceMeta("chain", layers, experts, 1, "record", expert_bytes=1000), [seq])


def toy_trace(rows, experts=4) -> Trace:
    arr = np.asarray(rows, dtype=np.int16)
    return Trace(TraceMeta("toy", arr.shape[1], experts, arr.shape[2], "test"), [SequenceTrace(experts=arr)])


def test_usage_entropy_and_reuse_by_hand():
    trace = toy_trace([[[0]], [[1]], [[0]], [[2]], [[0]], [[3]], [[-1]], [[3]]])
    usage = analysis.expert_usage(trace)
    assert usage.tolist() == [[3, 1, 1, 2]]
    uniform = analysis.usage_entropy(np.asarray([[2, 2, 2, 2]]))
    assert uniform == pytest.approx([1.0])
    assert analysis.usage_entropy(np.asarray([[8, 0, 0, 0]])) == pytest.approx([0.0])
    # present rows: 0 1 0 2 0 3 3 -> distances 0 0 2 0 2 0 1 (the absent cell is skipped)
    distances = analysis.reuse_distances(trace)
    assert distances.tolist() == [0, 0, 2, 0, 2, 0, 1]
    assert analysis.window_reuse(distances, 3).tolist() == pytest.approx([1 / 7, 3 / 7, 3 / 7])


def test_affinity_lookahead_and_lru_flags_on_a_chain():
    trace = chain_trace()
    probs, seen = analysis.affinity(trace)
    for layer in range(2):
        for i in range(4):
            if seen[layer, i]:
                assert probs[layer, i, (i + 1) % 4] == pytest.approx(1.0)
                assert probs[layer, i].sum() == pytest.approx(1.0)  # rows sum to top_k
    quality = analysis.lookahead_quality(trace)
    assert quality.precision_at_k == pytest.approx([1.0, 1.0])
    assert quality.chance == 0.25
    assert analysis.lookahead_quality(toy_trace([[[0]]])) is None
    # the LRU flags are the simulator's LRU decisions
    hits = sum(int(analysis.lru_flags(trace, layer, 2).sum()) for layer in range(3))
    assert hits == simulate(trace, "lru", 2, "cpu-nvme").hits


def test_confidence_and_pruning():
    trace = chain_trace()
    centres, rate, count = analysis.confidence_vs_hits(trace, 2, bins=5)
    assert count.sum() == trace.num_accesses and len(centres) == 5
    assert np.nanmin(rate) >= 0 and np.nanmax(rate) <= 1
    assert analysis.confidence_vs_hits(toy_trace([[[0]]]), 1) is None
    usage = np.asarray([[10, 1, 5, 4]])
    weights = np.asarray([[0.6, 0.05, 0.2, 0.15]])
    (c,) = analysis.pruning_candidates(usage, weights, 1)
    assert (c.layer, c.expert, c.usage_share, c.weight_share) == (0, 1, pytest.approx(0.05), pytest.approx(0.05))
    share = analysis.weight_share(trace)
    assert share.sum(axis=1) == pytest.approx(np.ones(3))


def test_analyze_command_writes_report(tmp_path, capsys):
    path = save_trace(chain_trace(), tmp_path / "chain.npz")
    out = tmp_path / "report"
    assert main(["analyze", str(path), "--out", str(out), "--cache-slots", "2", "--layer-pair", "1"]) == 0
    report = (out / "report.md").read_text()
    for section in ("Expert usage", "Reuse", "Inter-layer affinity", "LRU hit/miss", "Gate lookahead", "Pruning"):
        assert f"## {section}" in report
    assert "hit 1.000 of the next layer's experts" in report  # perfect lookahead logits
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "affinity-heatmap.png" in pngs and "lookahead.png" in pngs and len(pngs) >= 9
    assert all(f"({name})" in report for name in pngs)  # every figure is referenced
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in pngs)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--cache-slots", "9"], "--cache-slots 9 outside 1..4"),
        (["--layer-pair", "5"], "--layer-pair 5 outside 0..1"),
    ],
)
def test_analyze_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, fragment):
    path = save_trace(chain_trace(), tmp_path / "chain.npz")
    assert main(["analyze", str(path), "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_analyze_missing_trace_is_exit_2(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r")]) == 2
    assert "no such trace" in capsys.readouterr().err


def test_real_mixtral_routing_reuses_experts_more_than_chance():
    if not SHARED_TRACE.exists():
        pytest.skip("../shared/traces is absent")
    trace = load_trace(SHARED_TRACE)
    windows = analysis.window_reuse(analysis.reuse_distances(trace), 4)
    assert windows[0] > 1.2 * (2 / 8)  # previous-token reuse clearly above chance k/E
    probs, seen = analysis.affinity(trace)
    best = (probs.max(axis=2) * seen).sum() / seen.sum()
    assert best > 0.35  # the best next-layer expert given one at this layer beats chance (0.25)
    assert json.dumps(analysis.usage_entropy(analysis.expert_usage(trace)).tolist())
