"""The trace file format: round trip, refusal of damaged files, atomic writes, specs, the recorder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_env.cache import ExpertCacheState
from moe_env.embedded import embedded_model_dir
from moe_env.errors import TraceFormatError, UsageError
from moe_env.policy import ModelSpec, make_policy
from moe_env.routing import LayerRouting, route_events
from moe_env.trace import (
    SequenceTrace,
    Trace,
    TraceMeta,
    TraceRecorder,
    builtin_traces_dir,
    load_trace,
    read_trace_file,
    save_trace,
    validate_trace,
)

LAYERS, EXPERTS, TOP_K = 3, 8, 2
ARRAY_NAMES = (
    "experts",
    "weights",
    "gate_logits",
    "lookahead_logits",
    "prefill_experts",
    "prefill_weights",
    "prefill_gate_logits",
    "prefill_lookahead_logits",
    "prompt_ids",
    "output_ids",
)


def _f16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values that float16 represents exactly (so a round trip is bit-exact)."""
    return rng.normal(size=shape).astype(np.float16).astype(np.float32)


def _topk(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(n * LAYERS)]).reshape(n, LAYERS, TOP_K)


def make_sequence(rng: np.random.Generator, steps: int, prompt: int, split: str, prompt_id: str) -> SequenceTrace:
    experts = _topk(rng, steps).astype(np.int16)
    experts[-1, 1] = -1  # an absent cell
    lookahead = _f16(rng, (steps, LAYERS, EXPERTS))
    lookahead[:, -1] = np.nan
    prefill_lookahead = _f16(rng, (LAYERS, EXPERTS))
    prefill_lookahead[-1] = np.nan
    return SequenceTrace(
        experts=experts,
        weights=_f16(rng, (steps, LAYERS, TOP_K)),
        gate_logits=_f16(rng, (steps, LAYERS, EXPERTS)),
        lookahead_logits=lookahead,
        prefill_experts=_topk(rng, prompt).astype(np.int16),
        prefill_weights=_f16(rng, (prompt, LAYERS, TOP_K)),
        prefill_gate_logits=_f16(rng, (LAYERS, EXPERTS)),
        prefill_lookahead_logits=prefill_lookahead,
        prompt_ids=rng.integers(0, 100, prompt).astype(np.int32),
        output_ids=rng.integers(0, 100, steps + 1).astype(np.int32),
        prompt_id=prompt_id,
        split=split,
    )


def make_trace(seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    meta = TraceMeta("toy", LAYERS, EXPERTS, TOP_K, "record", config_hash="ab" * 32, expert_bytes=1234)
    meta.extra["note"] = "test"
    sequences = [
        make_sequence(rng, 7, 5, "train", "a"),
        make_sequence(rng, 4, 3, "eval", "b"),
        SequenceTrace(experts=_topk(rng, 2).astype(np.int16), prompt_id="bare"),  # only the required array
    ]
    return Trace(meta, sequences)


def assert_same(a: Trace, b: Trace) -> None:
    assert asdict(a.meta) == asdict(b.meta)
    assert len(a.sequences) == len(b.sequences)
    for sa, sb in zip(a.sequences, b.sequences, strict=True):
        assert (sa.prompt_id, sa.split) == (sb.prompt_id, sb.split)
        for name in ARRAY_NAMES:
            xa, xb = getattr(sa, name), getattr(sb, name)
            assert (xa is None) == (xb is None), name
            if xa is not None:
                np.testing.assert_array_equal(xa, xb, err_msg=name)  # NaN == NaN here


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    return save_trace(make_trace(), tmp_path / "toy.npz")


# --------------------------------------------------------------------------------------------- round trip


def test_round_trip_is_exact(trace_file: Path) -> None:
    loaded = read_trace_file(trace_file)
    assert_same(make_trace(), loaded)
    seq = loaded.sequences[0]
    assert seq.experts.dtype == np.int16 and seq.gate_logits.dtype == np.float32 and seq.prompt_ids.dtype == np.int32
    assert loaded.sequences[2].weights is None and loaded.sequences[2].gate_logits is None


def test_logits_are_stored_as_float16(tmp_path: Path) -> None:
    trace = make_trace()
    precise = np.random.default_rng(1).normal(size=trace.sequences[0].gate_logits.shape).astype(np.float32)
    trace.sequences[0].gate_logits = precise
    loaded = read_trace_file(save_trace(trace, tmp_path / "t.npz"))
    np.testing.assert_array_equal(loaded.sequences[0].gate_logits, precise.astype(np.float16).astype(np.float32))
    assert not np.array_equal(loaded.sequences[0].gate_logits, precise)


def test_file_is_a_plain_npz(trace_file: Path) -> None:
    with np.load(trace_file) as archive:
        assert archive["seq00000/experts"].shape == (7, LAYERS, TOP_K)


def test_routings_replay_identically_after_round_trip(trace_file: Path) -> None:
    """The simulator's RouteEvents from a loaded trace equal those of the in-memory trace (prefill signals too)."""

    def events(trace: Trace) -> list[tuple]:
        out = []
        for seq in trace.sequences:
            for routing in seq.routings():
                for event in route_events(routing, capacity=3):
                    look = event.lookahead_logits
                    out.append((event.step, event.layer, event.experts, None if look is None else look.tobytes()))
        return out

    original, loaded = make_trace(), read_trace_file(trace_file)
    assert events(original) == events(loaded)
    prefill_events = [e for e in events(loaded) if e[0] == -1]
    assert prefill_events and all(e[3] is not None for e in prefill_events if e[1] < LAYERS - 1)


# --------------------------------------------------------------------------------------------- refusals


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a trace zip member by member, letting `edit(name, bytes) -> bytes | None` change or drop members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def _member_data_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of each member's stored (compressed) data in the file."""
    raw = path.read_bytes()
    ranges = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            ranges.append((start, start + info.compress_size))
    return ranges


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_refused(trace_file: Path, keep: float) -> None:
    data = trace_file.read_bytes()
    trace_file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(TraceFormatError, match=r"corrupt or truncated|not a moe-env trace"):
        read_trace_file(trace_file)


def _flip(path: Path, position: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))


def test_flipped_byte_in_the_middle_of_each_member_is_refused(tmp_path: Path) -> None:
    original = save_trace(make_trace(), tmp_path / "t.npz")
    for index, (start, end) in enumerate(_member_data_ranges(original)):
        damaged = tmp_path / f"damaged{index}.npz"
        damaged.write_bytes(original.read_bytes())
        _flip(damaged, (start + end) // 2, 0x10)
        with pytest.raises(TraceFormatError) as info:
            read_trace_file(damaged)
        assert "\n" not in str(info.value)


@settings(max_examples=40, deadline=None)
@given(pick=st.floats(0, 1, exclude_max=True), member=st.integers(0, 10_000), mask=st.integers(1, 255))
def test_flipped_byte_is_refused_or_harmless(tmp_path_factory, pick: float, member: int, mask: int) -> None:
    """Any flip inside member data is refused, or (e.g. a deflate block's final-bit) leaves the content intact:
    never a silently different trace."""
    path = save_trace(make_trace(), tmp_path_factory.mktemp("flip") / "t.npz")
    ranges = _member_data_ranges(path)
    start, end = ranges[member % len(ranges)]
    _flip(path, start + int(pick * (end - start)), mask)
    try:
        loaded = read_trace_file(path)
    except TraceFormatError as exc:
        assert "\n" not in str(exc)
    else:
        assert_same(make_trace(), loaded)


def test_wrong_version_is_refused(trace_file: Path, tmp_path: Path) -> None:
    def bump(name: str, data: bytes) -> bytes:
        if name != "meta.json":
            return data
        header = json.loads(data)
        header["version"] = 2
        return json.dumps(header).encode()

    with pytest.raises(TraceFormatError, match=r"version 2 is not supported.*reads version 1"):
        read_trace_file(_rewrite(trace_file, tmp_path / "v2.npz", bump))


@pytest.mark.parametrize(
    ("member", "array", "message"),
    [
        ("seq00000/experts.npy", np.zeros((7, LAYERS + 1, TOP_K), np.int16), "expected L=3"),
        ("seq00000/experts.npy", np.zeros((7, LAYERS), np.int16), r"must have shape \[T, L, k\]"),
        ("seq00000/gate_logits.npy", np.zeros((6, LAYERS, EXPERTS), np.float16), "expected T=7"),
        ("seq00000/gate_logits.npy", np.zeros((7, LAYERS, EXPERTS + 1), np.float16), "expected E=8"),
        ("seq00000/prompt_ids.npy", np.zeros(4, np.int32), "expected P=5"),
        ("seq00000/experts.npy", np.full((7, LAYERS, TOP_K), EXPERTS, np.int16), "expected -1..7"),
        ("seq00000/experts.npy", np.zeros((7, LAYERS, TOP_K), np.float16), "stored as float16"),
        ("seq00000/prefill_experts.npy", np.full((5, LAYERS, TOP_K), -1, np.int16), "expected 0..7"),
    ],
)
def test_wrong_shape_dtype_or_range_is_refused(
    trace_file: Path, tmp_path: Path, member: str, array: np.ndarray, message: str
) -> None:
    bad = _rewrite(trace_file, tmp_path / "bad.npz", lambda name, data: _npy(array) if name == member else data)
    with pytest.raises(TraceFormatError, match=message):
        read_trace_file(bad)


def test_partly_absent_cell_is_refused(trace_file: Path, tmp_path: Path) -> None:
    experts = make_trace().sequences[0].experts.copy()
    experts[0, 0, 1] = -1

    def edit(name: str, data: bytes) -> bytes:
        return _npy(experts) if name == "seq00000/experts.npy" else data

    with pytest.raises(TraceFormatError, match="partly absent"):
        read_trace_file(_rewrite(trace_file, tmp_path / "bad.npz", edit))


def _per_sequence_verdict(trace: Trace) -> str | None:
    """What checking the sequences one by one says (the reference for validate_trace's joined checks)."""
    for i, seq in enumerate(trace.sequences):
        try:
            validate_trace(Trace(trace.meta, [seq]), "trace")
        except TraceFormatError as error:
            return str(error).replace("trace: sequence 0", f"trace: sequence {i}", 1)
    return None


@settings(max_examples=60, deadline=None)
@given(
    which=st.integers(0, 2),
    step=st.integers(0, 3),
    layer=st.integers(0, LAYERS - 1),
    flaw=st.sampled_from(["repeat", "partly absent", "out of range", "absent cell", "negative token", "huge logit"]),
)
def test_joined_checks_name_the_same_first_problem_as_one_by_one(which: int, step: int, layer: int, flaw: str) -> None:
    """validate_trace checks values over every sequence's arrays joined, then falls back to one by one to name
    the problem: the verdict and the message must be those of checking each sequence alone."""
    trace = make_trace()
    seq = trace.sequences[which]
    experts = seq.experts
    step = step % len(experts)
    if experts[step, layer, 0] < 0:  # make_sequence leaves one cell absent: flaw a routed cell instead
        layer = (layer + 1) % LAYERS
    if flaw == "repeat":
        experts[step, layer] = experts[step, layer, 0]
    elif flaw == "partly absent":
        experts[step, layer, 1] = -1
    elif flaw == "out of range":
        experts[step, layer, 0] = EXPERTS
    elif flaw == "absent cell":  # allowed: the whole cell absent
        experts[step, layer] = -1
    elif flaw == "negative token" and seq.output_ids is not None:
        seq.output_ids[0] = -3
    elif flaw == "huge logit" and seq.gate_logits is not None:
        seq.gate_logits[step, layer, 0] = 7e4
    expected = _per_sequence_verdict(trace)
    if expected is None:
        validate_trace(trace)
    else:
        with pytest.raises(TraceFormatError) as info:
            validate_trace(trace)
        assert str(info.value) == expected
    assert (expected is None) == (flaw == "absent cell" or (flaw in ("negative token", "huge logit") and which == 2))


def test_repeats_are_found_for_wide_top_k() -> None:
    """Above top-16 the repeat check sorts each cell instead of comparing column pairs: both ways are checked."""
    for top_k in (6, 20):
        meta = TraceMeta("wide", 1, 64, top_k, "record")
        experts = np.tile(np.arange(top_k, dtype=np.int16), (3, 1, 1))
        validate_trace(Trace(meta, [SequenceTrace(experts=experts.copy())]))
        experts[2, 0, top_k - 1] = experts[2, 0, 0]
        with pytest.raises(TraceFormatError, match=r"experts\[2, 0\] routes to expert 0 twice"):
            validate_trace(Trace(meta, [SequenceTrace(experts=experts)]))


def test_missing_member_is_refused(trace_file: Path, tmp_path: Path) -> None:
    def drop(name: str, data: bytes) -> bytes | None:
        return None if name == "seq00001/weights.npy" else data

    with pytest.raises(TraceFormatError, match=r"seq00001/weights.npy is missing"):
        read_trace_file(_rewrite(trace_file, tmp_path / "bad.npz", drop))


def test_other_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="no such trace file"):
        read_trace_file(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(TraceFormatError, match="corrupt or truncated"):
        read_trace_file(tmp_path / "text.npz")
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(TraceFormatError, match=r"no meta\.json"):
        read_trace_file(tmp_path / "plain.npz")


# --------------------------------------------------------------------------------------------- writing


def test_save_refuses_inconsistent_trace_and_writes_nothing(tmp_path: Path) -> None:
    trace = make_trace()
    trace.sequences[1].gate_logits = trace.sequences[1].gate_logits[:, :, :3]
    with pytest.raises(TraceFormatError, match="expected E=8"):
        save_trace(trace, tmp_path / "t.npz")
    trace = make_trace()
    trace.sequences[0].gate_logits[0, 0, 0] = 1e6
    with pytest.raises(TraceFormatError, match="float16 range"):
        save_trace(trace, tmp_path / "t.npz")
    assert list(tmp_path.iterdir()) == []


def test_written_file_is_readable_by_others_and_keeps_the_mode_it_replaces(tmp_path: Path) -> None:
    path = save_trace(make_trace(), tmp_path / "t.npz")
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o640)
    save_trace(make_trace(), path)
    assert path.stat().st_mode & 0o777 == 0o640


def test_failing_write_leaves_existing_file_untouched(trace_file: Path, monkeypatch) -> None:
    before = trace_file.read_bytes()
    calls = {"n": 0}
    real_write = np.lib.format.write_array

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(UsageError, match=r"cannot write the trace to .*: disk full"):
        save_trace(make_trace(seed=5), trace_file)
    assert trace_file.read_bytes() == before
    assert os.listdir(trace_file.parent) == [trace_file.name]  # no temp file left behind
    calls["n"] = 0
    with pytest.raises(UsageError, match="disk full"):
        save_trace(make_trace(), trace_file.parent / "new.npz")
    assert os.listdir(trace_file.parent) == [trace_file.name]


def test_interrupted_write_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_trace(make_trace(), tmp_path / "t.npz")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------- specs


def test_builtin_spec_resolution(tmp_path: Path) -> None:
    save_trace(make_trace(), tmp_path / "toy.npz")
    assert [s.prompt_id for s in load_trace("builtin:toy", builtin_dir=tmp_path).sequences] == ["a", "b", "bare"]
    assert [s.prompt_id for s in load_trace("builtin:toy/eval", builtin_dir=tmp_path).sequences] == ["b"]
    assert [s.prompt_id for s in load_trace("builtin:toy/train", builtin_dir=tmp_path).sequences] == ["a"]
    with pytest.raises(UsageError, match="no built-in trace 'nope'; available: toy"):
        load_trace("builtin:nope", builtin_dir=tmp_path)
    with pytest.raises(UsageError, match="unknown split 'test'"):
        load_trace("builtin:toy/test", builtin_dir=tmp_path)
    with pytest.raises(UsageError, match="no built-in trace ''"):
        load_trace("builtin:", builtin_dir=tmp_path)
    with pytest.raises(UsageError, match="shipped trace of tiny-olmoe is missing; record it: moe-env record"):
        load_trace("builtin:tiny-olmoe/eval", builtin_dir=tmp_path)


def test_path_specs(trace_file: Path, tmp_path: Path) -> None:
    assert_same(make_trace(), load_trace(str(trace_file)))
    with pytest.raises(UsageError, match="no such trace"):
        load_trace(str(tmp_path / "missing.npz"))
    log = tmp_path / "log.jsonl"
    log.write_text('{"problem_id": 0, "layer": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}\n')
    assert load_trace(str(log)).meta.source == "convert:jsonl-routing"


@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-olmoe"])
def test_shipped_traces_load(model: str) -> None:
    if not (builtin_traces_dir() / f"{model}.npz").exists():
        pytest.skip(f"shipped trace {model} not recorded yet")
    full = load_trace(f"builtin:{model}")
    evaluation = load_trace(f"builtin:{model}/eval")
    assert full.meta.source == "record" and full.meta.model == model
    assert len(full.sequences) == 64 and len(evaluation.sequences) == 16
    assert all(s.gate_logits is not None and s.prefill_experts is not None for s in full.sequences)
    model_dir = embedded_model_dir(model)
    if (model_dir / "config.json").exists():  # a retrained model makes the shipped trace stale: re-record it
        assert full.meta.config_hash == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
        weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
        assert full.meta.extra["weights_sha256"] == weights, "stale shipped trace: see docs/trace-format.md"


# --------------------------------------------------------------------------------------------- recorder


def _routing(layer: int, step: int, n: int, rng: np.random.Generator, last: bool) -> LayerRouting:
    return LayerRouting(
        layer=layer,
        step=step,
        experts=np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(n)]),
        weights=rng.random((n, TOP_K)).astype(np.float32),
        gate_logits=rng.normal(size=(n, EXPERTS)).astype(np.float32),
        lookahead_logits=None if last else rng.normal(size=(n, EXPERTS)).astype(np.float32),
    )


def test_recorder_assembles_the_stream() -> None:
    rng = np.random.default_rng(0)
    recorder = TraceRecorder(TraceMeta("toy", LAYERS, EXPERTS, TOP_K, "record"))
    recorder.label("p0", "eval")
    recorder.on_sequence_start([5, 6, 7, 8])
    stream = [_routing(layer, -1, 4, rng, layer == LAYERS - 1) for layer in range(LAYERS)]
    stream += [_routing(layer, step, 1, rng, layer == LAYERS - 1) for step in range(3) for layer in range(LAYERS)]
    for routing in stream:
        recorder(routing)
    seq = recorder.on_sequence_end([1, 2, 3, 4])
    assert (seq.prompt_id, seq.split) == ("p0", "eval")
    assert seq.experts.shape == (3, LAYERS, TOP_K) and seq.prefill_experts.shape == (4, LAYERS, TOP_K)
    for r in stream:
        if r.prefill:
            np.testing.assert_array_equal(seq.prefill_experts[:, r.layer], r.experts)
            np.testing.assert_array_equal(seq.prefill_gate_logits[r.layer], r.gate_logits[-1])
        else:
            np.testing.assert_array_equal(seq.experts[r.step, r.layer], r.experts[0])
            np.testing.assert_array_equal(seq.weights[r.step, r.layer], r.weights[0])
            np.testing.assert_array_equal(seq.gate_logits[r.step, r.layer], r.gate_logits[0])
    assert np.isnan(seq.lookahead_logits[:, -1]).all() and not np.isnan(seq.lookahead_logits[:, :-1]).any()
    assert np.isnan(seq.prefill_lookahead_logits[-1]).all()
    np.testing.assert_array_equal(seq.prompt_ids, [5, 6, 7, 8])
    # the recorded sequence replays to the same RouteEvents as the live stream
    replayed = [(r.step, r.layer, r.experts.tolist()) for r in seq.routings()]
    assert replayed == [(r.step, r.layer, r.experts.tolist()) for r in stream]


def test_recorder_leaves_missing_cells_absent_and_signals_none() -> None:
    recorder = TraceRecorder(TraceMeta("toy", 2, EXPERTS, TOP_K, "record"))
    recorder.on_sequence_start()
    recorder(LayerRouting(layer=0, step=0, experts=np.array([[1, 2]])))
    recorder(LayerRouting(layer=1, step=2, experts=np.array([[3, 4]])))
    seq = recorder.on_sequence_end()
    assert seq.experts[:, :, 0].tolist() == [[1, -1], [-1, -1], [-1, 3]]
    assert seq.weights is None and seq.gate_logits is None and seq.prefill_experts is None


def test_recorder_rejects_a_malformed_stream() -> None:
    recorder = TraceRecorder(TraceMeta("toy", 2, EXPERTS, TOP_K, "record"))
    with pytest.raises(RuntimeError, match="outside a sequence"):
        recorder(LayerRouting(layer=0, step=0, experts=np.array([[1, 2]])))
    recorder.on_sequence_start()
    recorder(LayerRouting(layer=0, step=0, experts=np.array([[1, 2]])))
    with pytest.raises(ValueError, match="routed twice"):
        recorder(LayerRouting(layer=0, step=0, experts=np.array([[1, 2]])))
    with pytest.raises(ValueError, match="layer 2 outside"):
        recorder(LayerRouting(layer=2, step=0, experts=np.array([[1, 2]])))
    with pytest.raises(ValueError, match="one token"):
        recorder(LayerRouting(layer=1, step=0, experts=np.array([[1, 2], [3, 4]])))


def test_lru_replay_of_a_saved_trace_matches_in_memory_replay(trace_file: Path) -> None:
    def hits(trace: Trace) -> tuple[int, int]:
        spec = ModelSpec(LAYERS, EXPERTS, TOP_K)
        cache = ExpertCacheState(spec, 3, make_policy("lru"))
        for seq in trace.sequences:
            cache.begin_sequence()
            for routing in seq.routings():
                for event in route_events(routing, 3):
                    cache.route(event)
        return cache.counters.hits, cache.counters.misses

    assert hits(make_trace()) == hits(read_trace_file(trace_file))
