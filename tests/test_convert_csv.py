"""`moe-env convert` and load_trace for per-prompt CSV routing logs (the DeepSeek-V2-Lite format), and sequence
selection in trace specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_env.cli import main
from moe_env.errors import MoeEnvError, UsageError
from moe_env.sim import simulate
from moe_env.trace import load_trace, read_trace_file
from moe_env.trace_csv import import_csv_routing
from moe_env.trace_select import select_sequences

SHARED_DSV2 = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "dsv2lite-puffin"
HEADER = "Layer ID,Batch Number,Token,Activated Expert IDs"


def _write_prompt(directory: Path, n: int, tokens: list[str], routing: list[list[list[int]]]) -> Path:
    """routing[layer][token] = experts; rows grouped by layer (ids 1..L), as the real logs are."""
    lines = [HEADER]
    for layer, per_token in enumerate(routing, start=1):
        for token, experts in zip(tokens, per_token, strict=True):
            quoted = '"' + token.replace('"', '""') + '"' if any(c in token for c in ',"') else token
            lines.append(f'{layer},0,{quoted},"[{", ".join(map(str, experts))}]"')
    path = directory / f"prompt_{n}_data.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    """Prompts 10, 2 and 1 (3..9 missing), 2 layers, 8 experts, top-2; a token holds a comma and a quote."""
    directory = tmp_path / "logs"
    directory.mkdir()
    _write_prompt(directory, 10, ["<s>", "Ġa"], [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    _write_prompt(directory, 2, ["<s>", 'x,"y', "Ġa"], [[[1, 0], [3, 2], [5, 4]], [[7, 6], [1, 2], [3, 4]]])
    _write_prompt(directory, 1, ["Ġa"], [[[2, 5]], [[6, 1]]])
    return directory


def test_directory_import_keeps_prompts_layers_and_tokens(csv_dir: Path) -> None:
    trace = import_csv_routing(csv_dir, model_name="toy")
    meta = trace.meta
    assert (meta.model, meta.source, meta.num_layers, meta.num_experts, meta.top_k) == (
        "toy", "convert:csv-routing", 2, 8, 2
    )  # fmt: skip
    assert meta.extra["layer_ids"] == [1, 2]
    assert [s.prompt_id for s in trace.sequences] == ["1", "2", "10"]  # numeric order, not "1", "10", "2"
    second = trace.sequences[1]
    assert second.experts.tolist() == [[[1, 0], [7, 6]], [[3, 2], [1, 2]], [[5, 4], [3, 4]]]  # [step, layer, k]
    vocab = meta.extra["vocab"]
    assert vocab == sorted(vocab) and set(vocab) == {"<s>", 'x,"y', "Ġa"}
    assert [vocab[i] for i in second.output_ids] == ["<s>", 'x,"y', "Ġa"]  # step t consumes token t
    assert [vocab[i] for i in trace.sequences[2].output_ids] == ["<s>", "Ġa"]
    # no weights, no logits, no prefill: absent, never invented
    assert all(s.weights is None and s.gate_logits is None and s.lookahead_logits is None for s in trace.sequences)
    assert all(s.prefill_experts is None for s in trace.sequences)


def test_one_file_and_the_directory_agree(csv_dir: Path) -> None:
    whole = import_csv_routing(csv_dir, model_name="toy")
    single = import_csv_routing(csv_dir / "prompt_2_data.csv", model_name="toy", num_experts=8)
    assert len(single.sequences) == 1 and single.sequences[0].prompt_id == "2"
    np.testing.assert_array_equal(single.sequences[0].experts, whole.sequences[1].experts)
    strings = [single.meta.extra["vocab"][i] for i in single.sequences[0].output_ids]
    assert strings == [whole.meta.extra["vocab"][i] for i in whole.sequences[1].output_ids]


def test_known_model_fixes_the_shape(csv_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(MoeEnvError, match="deepseek-v2-lite has 26 layers with top-6"):
        import_csv_routing(csv_dir)  # the default model name, but 2 layers of top-2
    directory = tmp_path / "dsv2"
    directory.mkdir()
    routing = [[[layer % 6, 6 + layer % 7, 20, 30, 40, 50]] for layer in range(26)]
    _write_prompt(directory, 5, ["Ġhi"], routing)
    trace = import_csv_routing(directory)
    assert (trace.meta.model, trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (
        "deepseek-v2-lite", 26, 64, 6
    )  # fmt: skip  # 64 experts though the largest id seen is 50: the model's shape, not the sample's
    _write_prompt(directory, 7, ["Ġhi", "Ġyou"], [[[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 6]]] * 26)
    # bench takes the directory itself, with a selection by prompt id, and the model's cost profile by shape
    assert main(["bench", "--trace", f"{directory}#id=7", "--policies", "lru", "--cache-slots", "6", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["policy"], r["hits"], r["misses"]) for r in rows} >= {("lru", 26 * 5, 26 * 7)}


def test_convert_command_and_load_trace_accept_the_directory(csv_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "toy.npz"
    assert main(["convert", str(csv_dir), "--out", str(out), "--model-name", "toy"]) == 0
    assert "3 sequences" in capsys.readouterr().err
    saved = read_trace_file(out)
    assert saved.meta.extra["vocab"] == import_csv_routing(csv_dir, model_name="toy").meta.extra["vocab"]
    assert [s.output_ids.tolist() for s in saved.sequences] == [
        s.output_ids.tolist() for s in import_csv_routing(csv_dir, model_name="toy").sequences
    ]
    assert (
        main(
            [
                "bench",
                "--trace",
                f"{out}#0,2",
                "--policies",
                "lru",
                "--cache-slots",
                "2,3",
                "--json",
                "--profile",
                "consumer-pcie4:deepseek-v2-lite",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert {r["slots"] for r in rows} == {2, 3}
    accesses = (1 + 2) * 2 * 2  # the selected sequences 0 and 2 (1 and 2 steps) x 2 layers x top-2
    assert all(r["hits"] + r["misses"] == accesses for r in rows)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("prompt_1_data.csv", "a,b\n1,2\n", "not a routing CSV with columns"),
        ("prompt_1_data.csv", HEADER + '\n1,0,x,"[1, 2]"\n1,0,y,"[3]"\n', ":3: expert ids '[3]' are not a list"),
        ("prompt_1_data.csv", HEADER + '\n1,0,x,"[1, 2]"\n1,0,y,"[3, a]"\n', ":3: expert ids '[3, a]'"),
        ("prompt_1_data.csv", HEADER + '\n1,0,x,"[1, -2]"\n', ":2: expert ids '[1, -2]'"),
        ("prompt_1_data.csv", HEADER + '\n1,0,x,"1, 2"\n', ":2: expert ids '1, 2'"),
        ("prompt_1_data.csv", HEADER + '\n1,0,x,"[1, 1]"\n', ":2: experts [1, 1] repeat an expert"),
        ("prompt_1_data.csv", HEADER + '\n1,1,x,"[1, 2]"\n', ":2: batch number 1; only batch 0"),
        ("prompt_1_data.csv", HEADER + '\n1,0,x,"[1, 2]"\n2,0,x,"[1, 2]"\n2,0,y,"[1, 2]"\n', "different token counts"),
        ("prompt_1_data.csv", HEADER + '\n1,0,x,"[1, 2]"\n2,0,y,"[1, 2]"\n', "token 0 differs between layers"),
        ("prompt_1_data.csv", HEADER + "\n", "no routing rows"),
        ("prompt_1_data.csv", HEADER + '\n,0,x,"[1, 2]"\n', ":2: empty 'Layer ID'"),
    ],
)
def test_malformed_csv_is_a_one_line_error(tmp_path: Path, capsys, name: str, content: str, message: str) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    (directory / name).write_text(content)
    out = tmp_path / "out.npz"
    assert main(["convert", str(directory), "--out", str(out), "--model-name", "toy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_files_of_different_layers_are_refused(csv_dir: Path, capsys, tmp_path: Path) -> None:
    _write_prompt(csv_dir, 4, ["Ġa"], [[[2, 5]], [[6, 1]], [[0, 3]]])
    assert main(["convert", str(csv_dir), "--out", str(tmp_path / "o.npz"), "--model-name", "toy"]) == 2
    assert "prompt_4_data.csv: layer ids 1..3 differ from prompt_1_data.csv's 1..2" in capsys.readouterr().err


def test_sequence_selection_by_position_and_prompt_id(csv_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "toy.npz"
    assert main(["convert", str(csv_dir), "--out", str(out), "--model-name", "toy"]) == 0
    ids = lambda spec: [s.prompt_id for s in load_trace(spec).sequences]  # noqa: E731
    assert ids(f"{out}#2,0") == ["10", "1"]
    assert ids(f"{out}#0-1") == ["1", "2"]
    assert ids(f"{out}#id=2-10") == ["2", "10"]  # prompt numbers; 3..9 are missing and skipped
    assert ids(f"{out}#id=10,1") == ["10", "1"]
    for bad, message in [
        ("#3", "position 3 is past the 3 sequences"),
        ("#1-0", "range 1-0 runs backwards"),
        ("#0,0", "names a sequence twice"),
        ("#x", "'x' is not a position or a range"),
        ("#0,", "empty item"),
        ("#id=3-9", "selects no sequence"),
        ("#id=7", "no sequence with prompt id '7'"),
    ]:
        with pytest.raises(UsageError, match=message):
            load_trace(f"{out}{bad}")


def test_a_log_of_another_shape_under_the_default_name_says_how_to_convert(csv_dir: Path) -> None:
    with pytest.raises(MoeEnvError, match="moe-env convert LOG --model-name NAME"):
        load_trace(csv_dir / "prompt_2_data.csv")


@pytest.fixture(scope="module")
def dsv2() -> object:
    if not SHARED_DSV2.is_dir():
        pytest.skip("../shared/traces is absent")
    return load_trace(SHARED_DSV2)


def test_real_dsv2lite_directory_imports_whole(dsv2) -> None:
    meta = dsv2.meta
    assert (meta.model, meta.num_layers, meta.num_experts, meta.top_k) == ("deepseek-v2-lite", 26, 64, 6)
    assert len(dsv2.sequences) == 999 and dsv2.num_steps == 94165  # ../shared/traces/README.md: about 94 k tokens
    assert [s.prompt_id for s in dsv2.sequences[:3]] == ["1", "2", "3"] and "317" not in {
        s.prompt_id for s in dsv2.sequences
    }
    assert max(s.num_steps for s in dsv2.sequences) == 2850
    first = dsv2.sequences[0]
    assert first.experts[0, 0].tolist() == [8, 26, 56, 57, 60, 43]  # prompt_1, layer 1, first token
    assert meta.extra["vocab"][first.output_ids[0]] == "<｜begin▁of▁sentence｜>"


# Hit rates of prompts 1-40 (per-layer caches, empty at each prompt's start), computed with
#   python -c "from moe_env.trace import load_trace; from moe_env.sim import simulate; t = load_trace(
#   '../shared/traces/dsv2lite-puffin#id=1-40'); print({s: {p: round(simulate(t, p, s).hit_rate, 4)
#   for p in ('lru', 'lfu', 'belady')} for s in (8, 16, 32)})"
# The whole set reproduces the README's reference figures: see README.md ("DeepSeek-V2-Lite routing").
SUBSET_REFERENCE = {
    8: {"lru": 0.3196, "lfu": 0.3363, "belady": 0.4217},
    16: {"lru": 0.4848, "lfu": 0.5042, "belady": 0.6515},
    32: {"lru": 0.6951, "lfu": 0.7129, "belady": 0.8133},
}


@pytest.mark.parametrize("slots", [8, 16, 32])
def test_reference_hit_rates_on_a_dsv2lite_subset(dsv2, slots) -> None:
    subset = select_sequences(dsv2, "id=1-40")  # = load_trace(f"{SHARED_DSV2}#id=1-40"), without parsing twice
    assert len(subset.sequences) == 40
    for policy, expected in SUBSET_REFERENCE[slots].items():
        result = simulate(subset, policy, slots, "consumer-pcie4")
        assert result.hits + result.misses == subset.num_accesses
        assert result.hit_rate == pytest.approx(expected, abs=0.0005), (policy, slots)


def _reference_int_lists(texts: list[str]) -> np.ndarray | int:
    """What parse_int_lists must return: the rows' integers, or the first row that is not ``[D, D, ...]`` with
    as many numbers as the first row (the bad row the error names)."""
    import re

    parsed = []
    for row, text in enumerate(texts):
        if re.fullmatch(r"\[\d+(, ?\d+)*\]", text) is None:
            return row
        parsed.append([int(v) for v in re.findall(r"\d+", text)])
        if len(parsed[-1]) != len(parsed[0]):
            return row
    return np.asarray(parsed, dtype=np.int64)


_LIST_PIECES = st.sampled_from(["[", "]", ",", ", ", " ", "0", "7", "12", "63", "x", "-", "[]", "][", ",,"])


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 999), min_size=3, max_size=3), min_size=1, max_size=6),
    spaced=st.lists(st.booleans(), min_size=6, max_size=6),
    damage=st.one_of(st.none(), st.tuples(st.integers(0, 5), st.integers(0, 30), st.lists(_LIST_PIECES, max_size=3))),
)
def test_expert_lists_parse_as_the_grammar_says(rows, spaced, damage) -> None:
    """The vectorised parser agrees with a per-row regular expression on well-formed lists and on damaged ones
    (a piece inserted or a byte replaced): the same integers, or the same first bad row."""
    import pyarrow as pa

    from moe_env.errors import TraceFormatError
    from moe_env.trace_csv import parse_int_lists

    texts = ["[" + (", " if spaced[i] else ",").join(map(str, row)) + "]" for i, row in enumerate(rows)]
    if damage is not None:
        row, at, pieces = damage
        row %= len(texts)
        at %= len(texts[row]) + 1
        texts[row] = texts[row][:at] + "".join(pieces) + texts[row][at + 1 :]
    expected = _reference_int_lists(texts)
    if isinstance(expected, np.ndarray) and expected.max() > np.iinfo(np.int16).max:  # digits run together
        big = int(np.flatnonzero((expected > np.iinfo(np.int16).max).any(axis=1))[0])
        with pytest.raises(TraceFormatError, match=rf"^row {big}: expert id {expected[big].max()} does not fit"):
            parse_int_lists(pa.array(texts), lambda r: f"row {r}")
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(parse_int_lists(pa.array(texts), lambda r: f"row {r}"), expected)
    else:
        with pytest.raises(TraceFormatError, match=rf"^row {expected}: expert ids"):
            parse_int_lists(pa.array(texts), lambda r: f"row {r}")


def test_expert_lists_parse_across_chunks() -> None:
    """A chunked column (one chunk per batch of files) parses chunk by chunk; rows are named in the whole column."""
    import pyarrow as pa

    from moe_env.errors import TraceFormatError
    from moe_env.trace_csv import parse_int_lists

    column = pa.chunked_array([pa.array(["[1, 2]", "[3, 4]"]), pa.array([], pa.string()), pa.array(["[5,6]"])])
    assert parse_int_lists(column, str).tolist() == [[1, 2], [3, 4], [5, 6]]
    with pytest.raises(TraceFormatError, match=r"^2: expert ids '\[5 6\]' are not a list .* like '\[1, 2\]'$"):
        parse_int_lists(pa.chunked_array([pa.array(["[1, 2]", "[3, 4]"]), pa.array(["[5 6]"])]), str)
    with pytest.raises(TraceFormatError, match=r"^1: expert id 40000 does not fit the trace format$"):
        parse_int_lists(pa.chunked_array([pa.array(["[1, 2]"]), pa.array(["[3, 40000]", "[5, 6]"])]), str)
    with pytest.raises(TraceFormatError, match=r"^0: expert id 123456789012345678901 does not fit the trace format$"):
        parse_int_lists(pa.chunked_array([pa.array(["[123456789012345678901, 2]"])]), str)  # past the parser's cap


def _per_file(monkeypatch, path: Path, name: str | None = None):
    """The import through the per-file assembly only (the path the grouped one must equal bit for bit)."""
    import moe_env.trace_csv as trace_csv

    with monkeypatch.context() as patch:
        patch.setattr(trace_csv, "_grouped_sequences", lambda *args: None)
        return import_csv_routing(path, model_name=name)


def _assert_identical(one, other) -> None:
    assert one.meta == other.meta and len(one.sequences) == len(other.sequences)
    for a, b in zip(one.sequences, other.sequences, strict=True):
        assert a.prompt_id == b.prompt_id
        for name in ("experts", "output_ids"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name


def test_all_files_at_once_equal_file_by_file(csv_dir: Path, monkeypatch, tmp_path: Path) -> None:
    _assert_identical(import_csv_routing(csv_dir, model_name="toy"), _per_file(monkeypatch, csv_dir, "toy"))
    if SHARED_DSV2.is_dir():  # real logs: the first 60 prompts
        sample = tmp_path / "sample"
        sample.mkdir()
        for file in sorted(SHARED_DSV2.glob("prompt_*_data.csv"))[:60]:
            (sample / file.name).write_bytes(file.read_bytes())
        _assert_identical(import_csv_routing(sample), _per_file(monkeypatch, sample))


def test_a_file_whose_rows_are_not_grouped_by_layer_is_reordered(csv_dir: Path, tmp_path: Path) -> None:
    shuffled = tmp_path / "other" / "logs"  # the same directory name: meta.extra names it
    shuffled.mkdir(parents=True)
    for file in csv_dir.iterdir():
        header, *rows = file.read_text(encoding="utf-8").splitlines()
        # layer 2's rows first: still one sequence per file, tokens in order within each layer
        rows = [r for r in rows if r.startswith("2,")] + [r for r in rows if r.startswith("1,")]
        (shuffled / file.name).write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    _assert_identical(import_csv_routing(shuffled, model_name="toy"), import_csv_routing(csv_dir, model_name="toy"))


def test_files_parsed_together_split_where_a_quoted_token_holds_a_newline(tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    _write_prompt(directory, 1, ["a,\nb", "c"], [[[0, 1], [2, 3]]])  # a raw newline inside a quoted token
    _write_prompt(directory, 2, ["d"], [[[4, 5]]])
    _write_prompt(directory, 3, ["e,\n", "\n,f", "g"], [[[6, 7], [1, 0], [3, 2]]])
    from moe_env.trace_csv import _read_batch, csv_files

    table, counts = _read_batch(csv_files(directory))  # one parse for the three files, not the per-file fallback
    assert counts == [2, 1, 3] and table.num_rows == 6
    together = import_csv_routing(directory, model_name="toy")
    assert [s.num_steps for s in together.sequences] == [2, 1, 3]
    vocab = together.meta.extra["vocab"]
    assert [vocab[i] for i in together.sequences[2].output_ids] == ["e,\n", "\n,f", "g"]
    _assert_identical(together, _per_file(monkeypatch, directory, "toy"))


def test_a_bad_file_among_good_ones_is_named(csv_dir: Path, capsys) -> None:
    (csv_dir / "prompt_5_data.csv").write_text(HEADER + '\n1,0,"open,"[1, 2]"\n', encoding="utf-8")  # open quote
    assert main(["convert", str(csv_dir), "--out", str(csv_dir.parent / "t.npz"), "--model-name", "toy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prompt_5_data.csv" in err and "Traceback" not in err, err
