"""Import per-prompt CSV routing logs (the DeepSeek-V2-Lite format of ../shared/traces/dsv2lite-puffin).

One file per prompt, ``prompt_N_data.csv``, header ``Layer ID,Batch Number,Token,Activated Expert IDs``; one row
per (MoE layer, token), the experts as a Python-style list ``"[8, 26, 56, 57, 60, 43]"``. Each file is one decode
sequence whose tokens are known: step t consumes token t, so ``output_ids`` has one id per step. Token ids index
``meta.extra["vocab"]``, the sorted distinct token strings of the import (moe_env.token_vocab translates ids
between traces). The sorted layer ids map to 0..L-1 (the dense layer 0 of DeepSeek-V2 is not logged: ids 1..26).
No weights and no logits: they stay None. Files are parsed with pyarrow's CSV reader, the expert lists by a
compiled pass over their bytes (moe_env.parse_jit).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from moe_env.errors import TraceFormatError
from moe_env.import_progress import byte_progress, file_size
from moe_env.known_models import resolve_shape
from moe_env.trace import SequenceTrace, Trace, TraceMeta, validate_trace

CSV_FORMAT = "convert:csv-routing"
DEFAULT_MODEL = "deepseek-v2-lite"
COLUMNS = ("Layer ID", "Batch Number", "Token", "Activated Expert IDs")
_PROMPT_FILE = re.compile(r"^prompt_(\d+)_data\.csv$")
_COLUMN_TYPES = {COLUMNS[0]: pa.int64(), COLUMNS[1]: pa.int64(), COLUMNS[2]: pa.string(), COLUMNS[3]: pa.string()}
_CONVERT = pacsv.ConvertOptions(
    column_types=_COLUMN_TYPES, include_columns=list(COLUMNS), strings_can_be_null=False, null_values=[""]
)
_PARSE = pacsv.ParseOptions(newlines_in_values=True)  # a quoted token may hold a raw newline
_READ = pacsv.ReadOptions(use_threads=False)  # one thread per batch of files, batches read in parallel instead
READ_THREADS = min(8, os.cpu_count() or 1)
BATCH_BYTES = 4 << 20  # files parsed together in batches of about this size, batches in parallel
_SENTINEL = b"\x01moe-env: next file\x01"
_SENTINEL_ROW = b'0,0,"' + _SENTINEL + b'","[0]"\n'


def csv_files(path: Path) -> list[Path]:
    """The CSV files of a directory import, sorted by prompt number (``prompt_N_data.csv``; other ``*.csv`` files
    by name after them), or the one file given."""
    if path.is_file():
        return [path]
    files = [p for p in path.iterdir() if p.suffix == ".csv" and p.is_file()]
    if not files:
        raise TraceFormatError(f"{path}: no .csv files in this directory")

    def key(p: Path) -> tuple[int, int, str]:
        match = _PROMPT_FILE.match(p.name)
        return (0, int(match.group(1)), "") if match else (1, 0, p.name)

    return sorted(files, key=key)


def prompt_id_of(path: Path) -> str:
    """``prompt_12_data.csv`` -> "12" (so selections by prompt number are easy); other names: the file's stem."""
    match = _PROMPT_FILE.match(path.name)
    return match.group(1) if match else path.stem


class _Rows:
    """All files' rows in one table (parsed once, vectorised), and which file each row came from."""

    def __init__(self, files: list[Path], tables: list[pa.Table], counts: list[int]):
        self.files = files
        self.bounds = np.cumsum([0, *counts])
        self.table = pa.concat_tables(tables)  # chunks kept: each column is joined once, when it is read

    def where(self, row: int) -> str:
        """'FILE:LINE' of a global row (line 1 is the header)."""
        index = int(np.searchsorted(self.bounds, row, side="right") - 1)
        return f"{self.files[index]}:{row - self.bounds[index] + 2}"

    def column(self, name: str) -> pa.Array:
        column = self.table.column(name)
        return column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)


def import_csv_routing(path: str | os.PathLike, model_name: str | None = None, num_experts: int | None = None) -> Trace:
    """A trace from a directory of per-prompt CSV logs or one CSV file: one sequence per file, in prompt order.

    `model_name` defaults to "deepseek-v2-lite"; a known model fixes the expert count (else the largest id seen
    + 1, or `num_experts`) and its layers and top-k are checked against the data."""
    path = Path(path)
    if not path.exists():
        raise TraceFormatError(f"{path}: no such file or directory")
    files = csv_files(path)
    sizes = {file: file_size(file) for file in files}
    batches = _batches(files, sizes)
    with byte_progress(files, f"import {path.name}") as advance, ThreadPoolExecutor(READ_THREADS) as pool:
        tables, counts = [], []
        for batch, read in zip(batches, pool.map(_read_batch, batches), strict=True):  # pyarrow releases the GIL
            if read is None:
                read = pa.concat_tables(one := [_read_table(file) for file in batch]), [t.num_rows for t in one]
            tables.append(read[0])
            counts += read[1]
            advance(sum(sizes[file] for file in batch))
    rows = _Rows(files, tables, counts)
    for column in COLUMNS:
        if rows.table.column(column).null_count:  # counted per chunk: no copy of the column
            nulls = rows.column(column).is_null().to_numpy(zero_copy_only=False)
            raise TraceFormatError(f"{rows.where(int(np.flatnonzero(nulls)[0]))}: empty {column!r}")
    batch = rows.column(COLUMNS[1]).to_numpy()
    if (batch != 0).any():
        row = int(np.flatnonzero(batch != 0)[0])
        raise TraceFormatError(f"{rows.where(row)}: batch number {batch[row]}; only batch 0 (one sequence) is read")
    experts = parse_int_lists(rows.table.column(COLUMNS[3]), rows.where)  # int16: small for the checks below
    _refuse_repeats(experts, rows.where)
    # encoded chunk by chunk (one dictionary for all: no copy of the strings), the indices joined
    tokens = pc.dictionary_encode(rows.table.column(COLUMNS[2])).unify_dictionaries()
    vocab_unsorted = tokens.chunk(0).dictionary.to_pylist()
    order = np.argsort(np.array(vocab_unsorted, dtype=object), kind="stable")  # ids follow the sorted strings
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    token_ids = rank[np.concatenate([chunk.indices.to_numpy() for chunk in tokens.chunks])]
    layers = rows.column(COLUMNS[0]).to_numpy()
    grouped = _grouped_sequences(files, rows.bounds, layers, experts, token_ids)
    sequences, layer_ids = grouped if grouped is not None else ([], None)
    for i, file in enumerate(files if grouped is None else ()):  # per file: names the first file that is off
        lo, hi = rows.bounds[i], rows.bounds[i + 1]
        ids, seq = _sequence(file, layers[lo:hi], experts[lo:hi], token_ids[lo:hi])
        if layer_ids is None:
            layer_ids = ids
        elif ids != layer_ids:
            raise TraceFormatError(f"{file}: layer ids {_span(ids)} differ from {files[0].name}'s {_span(layer_ids)}")
        sequences.append(seq)
    assert layer_ids is not None  # csv_files never returns an empty list
    name = model_name or DEFAULT_MODEL
    top_k = experts.shape[1]
    num_experts = resolve_shape(name, len(layer_ids), top_k, int(experts.max()) + 1, num_experts, str(path))
    if len({s.prompt_id for s in sequences}) != len(sequences):
        raise TraceFormatError(f"{path}: two files give the same prompt id")
    meta = TraceMeta(
        model=name,
        num_layers=len(layer_ids),
        num_experts=num_experts,
        top_k=top_k,
        source=CSV_FORMAT,
        extra={"source_file": path.name, "layer_ids": [layer_ids[0], layer_ids[-1]],
               "vocab": [vocab_unsorted[i] for i in order]},
    )  # fmt: skip
    trace = Trace(meta, sequences)
    validate_trace(trace, str(path))
    return trace


def _span(ids: tuple[int, ...]) -> str:
    return f"{ids[0]}..{ids[-1]}" if list(ids) == list(range(ids[0], ids[-1] + 1)) else str(list(ids))


def _batches(files: list[Path], sizes: dict[Path, int]) -> list[list[Path]]:
    """Consecutive files of about BATCH_BYTES together (pyarrow's cost per call is paid once per batch)."""
    batches: list[list[Path]] = [[]]
    size = 0
    for file in files:
        if batches[-1] and size >= BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(file)
        size += sizes[file]
    return batches


def _read_batch(files: list[Path]) -> tuple[pa.Table, list[int]] | None:
    """The files' rows (one table) and each file's row count from ONE pyarrow parse: the rows concatenated
    under the first file's header, a sentinel row (token _SENTINEL, found nowhere in the files) after each file's
    rows, so rows are told apart by file even where a quoted token holds a newline. None when a file is not
    plain (another header, a header with quotes, no rows, the sentinel's bytes inside, a parse error, a sentinel
    swallowed by an open quote): the per-file reader (``_read_table``) then reads the batch and names what is
    wrong."""
    header, bodies = None, []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError:
            return None
        cut = data.find(b"\n") + 1
        if cut == 0 or b'"' in data[:cut] or _SENTINEL in data or (header is not None and data[:cut] != header):
            return None
        header = header or data[:cut]
        bodies.append(data[cut:] if data.endswith(b"\n") else data[cut:] + b"\n")
    if header is None:
        return None
    try:
        table = pacsv.read_csv(pa.BufferReader(header + _SENTINEL_ROW.join(bodies) + _SENTINEL_ROW),
                               read_options=_READ, parse_options=_PARSE, convert_options=_CONVERT)  # fmt: skip
    except (pa.ArrowInvalid, pa.ArrowKeyError):
        return None
    sentinel = pc.equal(table.column(COLUMNS[2]), _SENTINEL.decode())
    ends = np.flatnonzero(sentinel.to_numpy(zero_copy_only=False))
    counts = np.diff(np.r_[-1, ends]) - 1
    if len(ends) != len(files) or ends[-1] != table.num_rows - 1 or (counts == 0).any():
        return None
    return table.filter(pc.invert(sentinel)), counts.tolist()


def _read_table(path: Path) -> pa.Table:
    try:
        table = pacsv.read_csv(path, read_options=_READ, parse_options=_PARSE, convert_options=_CONVERT)
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (pa.ArrowInvalid, pa.ArrowKeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceFormatError(f"{path}: not a routing CSV with columns {', '.join(COLUMNS)} ({first})") from None
    if table.num_rows == 0:
        raise TraceFormatError(f"{path}: no routing rows")
    return table


def _grouped_sequences(
    files: list[Path], bounds: np.ndarray, layers: np.ndarray, experts: np.ndarray, token_ids: np.ndarray
) -> tuple[list[SequenceTrace], tuple[int, ...]] | None:
    """Every file's sequence at once when the logs are as written (each file's rows grouped by ascending layer,
    the same layers and token count in every layer, the same tokens in every layer); None when anything differs,
    and the per-file path (``_sequence``) then reorders the file or names what is wrong with it."""
    if len(layers) == 0 or layers.min() < 0:
        return None
    starts = bounds[:-1]
    new_group = np.ones(len(layers), dtype=bool)
    new_group[1:] = layers[1:] != layers[:-1]
    new_group[starts] = True  # a file starts a group
    descending = np.zeros(len(layers), dtype=bool)
    descending[1:] = layers[1:] < layers[:-1]
    descending[starts] = False
    if descending.any():
        return None
    group_start = np.flatnonzero(new_group)
    groups_per_file = np.diff(np.searchsorted(group_start, bounds))
    num_layers = int(groups_per_file[0])
    if (groups_per_file != num_layers).any():
        return None
    layer_ids = layers[group_start].reshape(len(files), num_layers)
    steps = (bounds[1:] - starts) // num_layers
    sizes = np.diff(np.r_[group_start, len(layers)]).reshape(len(files), num_layers)
    if (layer_ids != layer_ids[0]).any() or (sizes != steps[:, None]).any():
        return None
    step = np.arange(len(layers)) - np.repeat(group_start, sizes.reshape(-1))  # each row's token index
    if (token_ids != token_ids[np.repeat(starts, bounds[1:] - starts) + step]).any():
        return None  # a token differs between layers
    sequences = []
    for i, file in enumerate(files):
        lo, hi, t = bounds[i], bounds[i + 1], int(steps[i])
        grid = experts[lo:hi].reshape(num_layers, t, -1).transpose(1, 0, 2)
        sequences.append(SequenceTrace(experts=np.ascontiguousarray(grid), output_ids=token_ids[lo : lo + t].copy(),
                                       prompt_id=prompt_id_of(file)))  # fmt: skip
    return sequences, tuple(int(i) for i in layer_ids[0])


def _sequence(
    file: Path, layers: np.ndarray, experts: np.ndarray, token_ids: np.ndarray
) -> tuple[tuple[int, ...], SequenceTrace]:
    """One file's rows (grouped by layer, tokens in order within a layer) -> its layer ids and [T, L, k] routing."""
    layer_ids, counts = np.unique(layers, return_counts=True)
    if layer_ids[0] < 0:
        raise TraceFormatError(f"{file}: negative layer id {layer_ids[0]}")
    if counts.min() != counts.max():
        short = int(layer_ids[np.argmin(counts)])
        raise TraceFormatError(
            f"{file}: layers have different token counts ({counts.min()} for layer {short}, {counts.max()} for others)"
        )
    order = np.argsort(layers, kind="stable")
    steps = int(counts[0])
    tokens = token_ids[order].reshape(len(layer_ids), steps)
    mismatch = np.flatnonzero((tokens != tokens[0]).any(axis=0))
    if mismatch.size:
        raise TraceFormatError(f"{file}: token {mismatch[0]} differs between layers; not one sequence")
    grid = experts[order].reshape(len(layer_ids), steps, -1).transpose(1, 0, 2)
    sequence = SequenceTrace(
        experts=np.ascontiguousarray(grid, dtype=np.int16), output_ids=tokens[0].copy(), prompt_id=prompt_id_of(file)
    )
    return tuple(int(i) for i in layer_ids), sequence


def _refuse_repeats(experts: np.ndarray, where) -> None:
    from moe_env.parse_jit import first_repeat

    row = int(first_repeat(experts))
    if row >= 0:
        raise TraceFormatError(f"{where(row)}: experts {experts[row].tolist()} repeat an expert")


def parse_int_lists(strings: pa.Array | pa.ChunkedArray, where) -> np.ndarray:
    """Strings like ``"[8, 26, 56]"`` (one list a row, the same length in every row) -> int16 array [rows, k].

    Each chunk's bytes are contiguous in its Arrow buffer, so the column is checked and parsed in one compiled
    pass over them, chunk by chunk (no copy of the column; moe_env.parse_jit.int_lists: the grammar ``[D, D,
    ..., D]``, D digits, a comma and at most one space between them, and the first row's count in every row). A
    malformed row names ``where(row)``; so does the first row with an id that does not fit the trace format."""
    from moe_env.parse_jit import SATURATE, int_lists  # numba: imported on the first CSV import only

    chunks = strings.chunks if isinstance(strings, pa.ChunkedArray) else [strings]
    chunks = [c if c.type in (pa.string(), pa.large_string()) else c.cast(pa.large_string()) for c in chunks]
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        return np.zeros((0, 1), dtype=np.int16)
    k = chunks[0][0].as_py().count(",") + 1 if chunks[0][0].is_valid else 1
    values = np.empty((sum(len(c) for c in chunks), k), dtype=np.int16)
    base, too_big = 0, None
    for chunk in chunks:
        rows = len(chunk)
        if chunk.null_count:
            null = int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
            _malformed(chunk, null, where, base, chunks[0])
        _, offsets_buf, data_buf = chunk.buffers()
        width = np.int64 if chunk.type == pa.large_string() else np.int32
        offsets = np.frombuffer(offsets_buf, dtype=width)[chunk.offset : chunk.offset + rows + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
        bad, big_row, big = int_lists(data, offsets, values[base : base + rows])
        if bad >= 0:
            _malformed(chunk, int(bad), where, base, chunks[0])
        if big_row >= 0 and too_big is None:
            text = chunk[int(big_row)].as_py() if big >= SATURATE else ""  # the parser caps a huge id: read it
            too_big = base + int(big_row), max([int(big)] + [int(v) for v in re.findall(r"\d+", text)])
        base += rows
    if too_big is not None:
        raise TraceFormatError(f"{where(too_big[0])}: expert id {too_big[1]} does not fit the trace format")
    return values


def _malformed(strings: pa.Array, row: int, where, base: int, example: pa.Array) -> None:
    """`row` of `strings` (row base + row of the whole column) is not a list of integers like example[0]."""
    raise TraceFormatError(
        f"{where(base + row)}: expert ids {strings[row].as_py()!r} are not a list of non-negative integers like "
        f"{example[0].as_py()!r}"
    )
