"""`moe-env convert` (JSONL routing logs) and `moe-env trace-info`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_env.cli import main
from moe_env.commands.trace_info import decode_routing_stats
from moe_env.routing_stats import routing_statistics
from moe_env.trace import SequenceTrace, Trace, TraceMeta, read_trace_file, save_trace

REAL_LOG = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mixtral-8x7b-gsm8k-routing.jsonl"
INFO_KEYS = [
    "sequences",
    "tokens",
    "layers",
    "experts",
    "top_k",
    "usage_entropy_ratio_min",
    "min_expert_share",
    "prev_token_reuse_over_chance",
]


def _record(pid: int, layer: int, experts: list[int], probs: list[float], token: int = 0) -> str:
    return json.dumps(
        {"dataset": "toy", "problem_id": pid, "layer": layer, "token_idx": token, "experts": experts,
         "gating_probs": probs}
    )  # fmt: skip


@pytest.fixture
def small_log(tmp_path: Path) -> Path:
    """Two problems, 2 layers; problem 0 layer 1 lost its second record (so it is padded at the end)."""
    lines = [
        _record(0, 0, [1, 2], [0.75, 0.25], 0),
        _record(0, 1, [3, 0], [0.5, 0.5], 0),
        _record(0, 0, [2, 3], [0.625, 0.375], 1),
        _record(0, 0, [5, 1], [0.875, 0.125], 2),
        _record(0, 1, [4, 5], [0.5, 0.5], 2),
        _record(1, 0, [0, 1], [0.75, 0.25], 0),
        _record(1, 1, [2, 1], [0.75, 0.25], 0),
    ]
    path = tmp_path / "toy-routing.jsonl"
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is fine
    return path


def test_convert_small_log(small_log: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "toy.npz"
    assert main(["convert", str(small_log), "--out", str(out), "--num-experts", "8"]) == 0
    assert "2 sequences" in capsys.readouterr().err
    trace = read_trace_file(out)
    meta = trace.meta
    assert (meta.model, meta.source, meta.num_layers, meta.num_experts, meta.top_k) == (
        "", "convert:jsonl-routing", 2, 8, 2
    )  # fmt: skip  # unnamed: the model is never the file's name
    assert meta.extra["dataset"] == "toy"
    first, second = trace.sequences
    assert (first.prompt_id, second.prompt_id) == ("0", "1")
    assert first.experts.tolist() == [[[1, 2], [3, 0]], [[2, 3], [4, 5]], [[5, 1], [-1, -1]]]  # file order per layer
    np.testing.assert_array_equal(first.weights[:, 0], [[0.75, 0.25], [0.625, 0.375], [0.875, 0.125]])
    assert np.isnan(first.weights[2, 1]).all()
    assert second.experts.shape == (1, 2, 2)
    assert first.gate_logits is None and first.lookahead_logits is None and first.prefill_experts is None


def test_convert_defaults_model_name_and_experts(small_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "toy.npz"
    assert main(["convert", str(small_log), "--out", str(out), "--model-name", "toy-model"]) == 0
    meta = read_trace_file(out).meta
    assert (meta.model, meta.num_experts) == ("toy-model", 6)  # largest id seen + 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"problem_id": 0, "layer": 0, "experts": [1, 2]}', "gating_probs missing here but not on earlier records"),
        ('{"problem_id": 0, "experts": [1, 2]}', "missing field(s) layer"),
        (_record(0, 0, [1, 2, 3], [0.5, 0.25, 0.25]), "3 experts, earlier records had 2"),
        (_record(0, -1, [1, 2], [0.5, 0.5]), "layer must be a non-negative integer"),
        (_record(0, 0, [1, 1], [0.5, 0.5]), "experts [1, 1] repeat an expert"),
        (_record(0, 0, [1, "x"], [0.5, 0.5]), "experts must be a non-empty list"),
        (_record(0, 0, [1, 2], [0.5]), "gating_probs must be 2 numbers"),
        (_record(0, 0, [1, 9], [0.5, 0.5]), "expert 9 >= --num-experts 8"),
    ],
)
def test_malformed_line_is_a_one_line_error(tmp_path: Path, capsys, line: str, message: str) -> None:
    log = tmp_path / "bad.jsonl"
    log.write_text(_record(0, 0, [1, 2], [0.5, 0.5]) + "\n" + line + "\n")
    out = tmp_path / "out.npz"
    assert main(["convert", str(log), "--out", str(out), "--num-experts", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"bad.jsonl:2: {message}" in err
    assert not out.exists()


def test_convert_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["convert", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.npz")]) == 2
    assert "no such input file" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["convert", str(empty), "--out", str(tmp_path / "o.npz")]) == 2
    assert "no routing records" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_LOG.exists(), reason="../shared/traces is absent")
def test_convert_real_mixtral_log(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mixtral.npz"
    assert main(["convert", str(REAL_LOG), "--out", str(out)]) == 0
    trace = read_trace_file(out)
    meta = trace.meta
    assert (len(trace.sequences), meta.num_layers, meta.num_experts, meta.top_k) == (2, 32, 8, 2)
    assert [s.num_steps for s in trace.sequences] == [168, 79]
    # every record is kept: present cells = lines of the file
    lines = sum(1 for line in REAL_LOG.read_text().splitlines() if line.strip())
    assert sum(int((s.experts[:, :, 0] >= 0).sum()) for s in trace.sequences) == lines
    np.testing.assert_allclose(trace.sequences[0].weights[0, 0], [0.8003801, 0.1996199], atol=1e-3)
    assert main(["trace-info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["sequences"], info["tokens"], info["layers"], info["experts"], info["top_k"]) == (2, 247, 32, 8, 2)
    assert 0.85 < info["usage_entropy_ratio_min"] <= 1.0
    assert 1.0 < info["prev_token_reuse_over_chance"] < 2.0  # real routing reuses experts more than chance


def test_trace_info_json_keys_and_values(small_log: Path, tmp_path: Path, capsys) -> None:
    assert main(["trace-info", str(small_log), "--json"]) == 0  # a JSONL log is converted on the fly
    info = json.loads(capsys.readouterr().out)
    assert list(info) == INFO_KEYS
    assert (info["sequences"], info["tokens"], info["layers"], info["experts"], info["top_k"]) == (2, 4, 2, 6, 2)
    # layer 1 of problem 0 is [3,0],[4,5] then absent: the absent cell is not counted
    # reuse: layer 0 pairs ({1,2},{2,3}) 1/2, ({2,3},{5,1}) 0; layer 1 pair ({3,0},{4,5}) 0 -> mean(1/4, 0) / (2/6)
    assert info["prev_token_reuse_over_chance"] == pytest.approx((0.25 + 0.0) / 2 / (2 / 6))


def test_trace_info_text_and_errors(small_log: Path, tmp_path: Path, capsys) -> None:
    assert main(["trace-info", str(small_log)]) == 0
    out = capsys.readouterr().out
    assert "prev_token_reuse_over_chance" in out and "toy-routing" in out
    assert main(["trace-info", str(tmp_path / "missing.npz")]) == 2
    assert main(["trace-info", "builtin:no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "no built-in trace 'no-such-model'" in err


def test_stats_equal_routing_statistics_when_nothing_is_absent() -> None:
    rng = np.random.default_rng(3)
    arrays = [np.stack([rng.permutation(16)[:4] for _ in range(n * 3)]).reshape(n, 3, 4) for n in (20, 9)]
    trace = Trace(TraceMeta("toy", 3, 16, 4, "record"), [])
    trace.sequences = [SequenceTrace(experts=a.astype(np.int16)) for a in arrays]
    expected = routing_statistics(arrays, 16)
    got = decode_routing_stats(trace)
    assert got["usage_entropy_ratio_min"] == pytest.approx(expected.usage_entropy_ratio_min)
    assert got["min_expert_share"] == pytest.approx(expected.min_expert_share)
    assert got["prev_token_reuse_over_chance"] == pytest.approx(expected.prev_token_reuse_over_chance)


def test_absent_cells_split_runs(tmp_path: Path) -> None:
    """A gap in a layer breaks prev-token pairs: [1,2] absent [1,2] has no pair, so reuse is undefined (null)."""
    experts = np.array([[[1, 2]], [[-1, -1]], [[1, 2]]], dtype=np.int16)
    trace = Trace(TraceMeta("toy", 1, 4, 2, "record"), [])
    trace.sequences = [SequenceTrace(experts=experts)]
    path = save_trace(trace, tmp_path / "gap.npz")
    stats = decode_routing_stats(read_trace_file(path))
    assert stats["min_expert_share"] == 0.0 and np.isnan(stats["prev_token_reuse_over_chance"])
