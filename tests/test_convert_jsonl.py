"""JSONL routing logs: the fast (pyarrow) and line-by-line readers agree, weights absent when the log has none,
prompt rows before decode rows split off as prefill, the model is never the file name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_env.cli import main
from moe_env.errors import TraceFormatError
from moe_env.trace_jsonl import _read_fast, _read_slow, import_jsonl_routing

REAL_LOG = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mixtral-8x7b-gsm8k-routing.jsonl"


def _line(pid, layer, experts, probs=None, token=None, **extra) -> str:
    record = {"problem_id": pid, "layer": layer, "experts": experts} | extra
    if probs is not None:
        record["gating_probs"] = probs
    if token is not None:
        record["token_idx"] = token
    return json.dumps(record)


def _write(tmp_path: Path, lines: list[str], name: str = "log.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _same_records(a, b) -> None:
    assert a.problem_ids == b.problem_ids and a.datasets == b.datasets and a.models == b.models
    for name in ("problem", "layer", "experts", "probs", "token_idx"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y)


def test_log_without_gating_probs_has_no_weights(tmp_path: Path) -> None:
    lines = [_line(0, layer, [layer, layer + 1], token=t) for t in range(3) for layer in range(2)]
    trace = import_jsonl_routing(_write(tmp_path, lines))
    (seq,) = trace.sequences
    assert seq.weights is None and seq.num_steps == 3  # absent, never invented
    assert seq.experts[:, 1].tolist() == [[1, 2]] * 3


def test_model_name_from_option_or_records_never_the_file(tmp_path: Path) -> None:
    lines = [_line(0, 0, [0, 1], [0.5, 0.5], model="my-moe"), _line(0, 0, [1, 2], [0.5, 0.5])]
    path = _write(tmp_path, lines, "humaneval_2_routing.jsonl")
    assert import_jsonl_routing(path).meta.model == "my-moe"
    assert import_jsonl_routing(path, model_name="m").meta.model == "m"
    path = _write(tmp_path, [_line(0, 0, [0, 1], [0.5, 0.5])], "gsm8k_2_routing.jsonl")
    assert import_jsonl_routing(path).meta.model == ""  # unnamed: identity by shape


def test_prompt_rows_before_decode_rows_become_the_prefill(tmp_path: Path, capsys) -> None:
    # token_idx runs 0..2 over the prompt, then restarts at 0 for the 2 decode tokens, in both layers
    lines = []
    for layer in range(2):
        lines += [_line(7, layer, [t, t + 1], [0.5, 0.5], token=t) for t in range(3)]
        lines += [_line(7, layer, [4 + t, 6], [0.75, 0.25], token=t) for t in range(2)]
    trace = import_jsonl_routing(_write(tmp_path, lines))
    (seq,) = trace.sequences
    assert seq.prefill_experts.shape == (3, 2, 2) and seq.num_steps == 2
    assert seq.prefill_experts[:, 0].tolist() == [[0, 1], [1, 2], [2, 3]]
    assert seq.experts[:, 1].tolist() == [[4, 6], [5, 6]]
    np.testing.assert_array_equal(seq.weights[:, 0], [[0.75, 0.25], [0.75, 0.25]])
    assert "prompt_rows" in trace.meta.extra


def test_decode_rows_all_at_token_zero_after_a_prompt(tmp_path: Path) -> None:
    """The raw collector's layout: prompt positions 0..P-1, then every decode row at position 0."""
    lines = [_line(0, 0, [t, t + 1], token=t) for t in range(4)] + [_line(0, 0, [6, 7], token=0)] * 3
    (seq,) = import_jsonl_routing(_write(tmp_path, lines)).sequences
    assert (len(seq.prefill_experts), seq.num_steps) == (4, 3)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([_line(0, 0, [0, 1], token=t) for t in (0, 1, 0, 1, 0)], "token_idx restarts 2 times in problem 0 layer 0"),
        (
            [_line(0, 0, [0, 1], token=t) for t in (0, 1, 0)] + [_line(0, 1, [0, 1], token=t) for t in (0, 1, 2, 0)],
            "layers disagree on the prompt length",
        ),
        ([_line(0, 0, [0, 1], [0.5, 0.5]), _line(0, 0, [0, 2])], ":2: gating_probs missing here"),
    ],
)
def test_ambiguous_logs_are_refused(tmp_path: Path, capsys, lines: list[str], message: str) -> None:
    out = tmp_path / "o.npz"
    assert main(["convert", str(_write(tmp_path, lines)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_fast_and_line_by_line_readers_agree(tmp_path: Path) -> None:
    lines = [_line(p, layer, [layer, 3 - layer], [0.25, 0.75], token=t, dataset="d")
             for p in ("a", "b") for t in range(2) for layer in range(3)]  # fmt: skip
    path = _write(tmp_path, [*lines, ""])
    fast = _read_fast(path, None)
    assert fast is not None
    _same_records(fast, _read_slow(path, None))


@pytest.mark.parametrize("block_bytes", [1, 60, 200, 1 << 20])
def test_blocks_parsed_on_threads_give_the_records_of_one_read(tmp_path: Path, block_bytes: int) -> None:
    """The log is cut at line ends into blocks (1 byte: a block per line) parsed in parallel: the records, their
    order and the progress reported are those of the whole file."""
    lines = [_line(p, layer, [layer, 5 - layer], [0.5, 0.5], token=t, model="m")
             for p in ("x", "7", "y") for t in range(3) for layer in range(3)]  # fmt: skip
    path = _write(tmp_path, lines)
    advanced: list[int] = []
    fast = _read_fast(path, None, advanced.append, block_bytes=block_bytes)
    assert fast is not None
    _same_records(fast, _read_slow(path, None))
    assert sum(advanced) == path.stat().st_size


@pytest.mark.parametrize("block_bytes", [1, 1 << 20])
def test_a_field_that_appears_only_in_a_later_block_reads_as_in_one_block(tmp_path: Path, block_bytes: int) -> None:
    """token_idx on the last record only, gating_probs on the first only: the blocks' tables unify with nulls, and
    the outcome is the line reader's (token_idx absent on some records: none kept; weights on some: refused)."""
    lines = [_line(0, layer, [0, 1]) for layer in range(4)] + [_line(0, 0, [0, 1], token=4)]
    fast = _read_fast(_write(tmp_path, lines), None, block_bytes=block_bytes)
    assert fast is not None and fast.token_idx is None
    _same_records(fast, _read_slow(_write(tmp_path, lines), None))
    lines = [_line(0, 0, [0, 1], [0.5, 0.5])] + [_line(0, layer, [0, 1]) for layer in range(4)]
    assert _read_fast(_write(tmp_path, lines), None, block_bytes=block_bytes) is None
    with pytest.raises(TraceFormatError, match="gating_probs missing here"):
        _read_slow(_write(tmp_path, lines), None)


def test_malformed_input_falls_back_to_the_line_reader(tmp_path: Path) -> None:
    path = _write(tmp_path, [_line(0, 0, [0, 1]), _line(0, 0.5, [0, 1])])
    assert _read_fast(path, None) is None
    with pytest.raises(TraceFormatError, match=r"log.jsonl:2: layer must be a non-negative integer"):
        import_jsonl_routing(path)


@pytest.mark.skipif(not REAL_LOG.exists(), reason="../shared/traces is absent")
def test_real_mixtral_log_fast_path_equals_the_line_reader() -> None:
    fast = _read_fast(REAL_LOG, None)
    assert fast is not None  # the real log takes the fast path
    _same_records(fast, _read_slow(REAL_LOG, None))
    trace = import_jsonl_routing(REAL_LOG)
    assert all(s.prefill_experts is None for s in trace.sequences)  # token_idx never restarts: all decode


def test_a_stray_expert_id_is_refused_not_taken_as_the_shape(tmp_path: Path, capsys) -> None:
    lines = [_line(0, 0, [t % 8, (t + 1) % 8], token=t) for t in range(16)]
    path = _write(tmp_path, [*lines, _line(0, 0, [3, 9999], token=16)])
    out = tmp_path / "t.npz"
    assert main(["convert", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expert ids reach 9999 but only 9 distinct ids" in err[0] and "--num-experts" in err[0]
    assert not out.exists()
    assert import_jsonl_routing(path, num_experts=10000).meta.num_experts == 10000  # confirmed by the user
    assert import_jsonl_routing(_write(tmp_path, lines, "clean.jsonl")).meta.num_experts == 8
