"""Import JSONL routing logs (the format of ../shared/traces/mixtral-8x7b-gsm8k-routing.jsonl).

One JSON object a line: ``problem_id``, ``layer``, ``experts`` (k ids), optional ``gating_probs`` (k weights),
``token_idx``, ``dataset`` and ``model``. One sequence per problem_id (order of first appearance); within a layer,
records in file order, short layers padded at the end with absent cells (the log dropped some records). A log
without ``gating_probs`` has no weights (None, never invented); one where only some records have them is refused.

Prompt rows before the decode rows (a collector that logged the prefill too): within a (problem, layer) the
``token_idx`` of such a log runs 0, 1, ..., P-1 over the prompt and restarts at 0 where decoding starts. The rows
before the restart are stored as the sequence's prefill (``prefill_experts``), the rest as decode; a log whose
layers disagree on P, or whose ``token_idx`` restarts more than once, is refused. Without ``token_idx`` every row
is decode.

The file is parsed with pyarrow's JSON reader (in blocks cut at line ends, on parallel threads) and checked
column-wise; only when that fails (malformed input) is it re-read line by line, which names the first bad line
(``FILE:LINE: what is wrong``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from moe_env.errors import TraceFormatError
from moe_env.import_progress import byte_progress
from moe_env.known_models import resolve_shape
from moe_env.trace import SequenceTrace, Trace, TraceMeta, validate_trace

JSONL_FORMAT = "convert:jsonl-routing"
REQUIRED = ("problem_id", "layer", "experts")
BLOCK_BYTES = 8 << 20  # parsed in blocks of about this size, on up to READ_THREADS threads
READ_THREADS = min(4, os.cpu_count() or 1)


@dataclass
class _Records:
    """The log column-wise, in file order."""

    problem: np.ndarray  # [N] index into problem_ids (order of first appearance)
    problem_ids: list[str]
    layer: np.ndarray  # [N]
    experts: np.ndarray  # [N, k]
    probs: np.ndarray | None  # [N, k] or None (no gating_probs in the log)
    token_idx: np.ndarray | None  # [N] or None (absent on some or all records)
    datasets: list[str]
    models: list[str]


def import_jsonl_routing(
    path: str | os.PathLike, model_name: str | None = None, num_experts: int | None = None
) -> Trace:
    """A trace from a JSONL routing log (module docstring). The model is `model_name`, else the records' ``model``
    field, else unnamed ("": identity by shape only), never the file name."""
    path = Path(path)
    with byte_progress([path], f"import {path.name}") as advance:
        records = _read_fast(path, num_experts, advance) or _read_slow(path, num_experts)
    if len(records.models) > 1:
        raise TraceFormatError(f"{path}: records name several models {records.models}; pass --model-name")
    name = model_name or (records.models[0] if records.models else "")
    top_k = records.experts.shape[1]
    num_layers = int(records.layer.max()) + 1
    seen = int(records.experts.max()) + 1
    distinct = len(np.unique(records.experts))
    num_experts = resolve_shape(name, num_layers, top_k, seen, num_experts, str(path), distinct_experts=distinct)
    extra: dict[str, Any] = {"source_file": path.name}
    if records.datasets:
        extra["dataset"] = ",".join(records.datasets)
    meta = TraceMeta(name, num_layers, num_experts, top_k, JSONL_FORMAT, extra=extra)
    trace = Trace(meta, _sequences(records, num_layers, path))
    prompts = sum(1 for s in trace.sequences if s.prefill_experts is not None)
    if prompts:
        meta.extra["prompt_rows"] = "token_idx restarts: rows before the restart stored as prefill"
    validate_trace(trace, str(path))
    return trace


# ------------------------------------------------------------------------------------------------ fast path


def _read_fast(
    path: Path,
    num_experts: int | None,
    advance: Callable[[int], object] = lambda _: None,
    block_bytes: int = BLOCK_BYTES,
) -> _Records | None:
    """Column-wise read and checks; None whenever anything is off (the slow path then names the line)."""
    try:
        table = _read_table(path, advance, block_bytes)
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    names = set(table.column_names)
    if table.num_rows == 0 or not set(REQUIRED) <= names:
        return None
    try:
        return _checked_columns(table, names, num_experts)
    except _Fallback:
        return None


def _read_table(path: Path, advance: Callable[[int], object], block_bytes: int) -> pa.Table:
    """The log as one table: the memory-mapped file cut at line ends into blocks that pyarrow's JSON reader
    parses on parallel threads (it releases the GIL), the progress bar moving as blocks finish. Every block is
    read with the first block's inferred schema (fields new in a later block are inferred there and the
    tables' schemas unified: a field absent from some blocks comes out null, which the checks refuse)."""
    with pa.memory_map(str(path)) as mapped:
        data = mapped.read_buffer()
        blocks = [data.slice(start, stop - start) for start, stop in _line_blocks(data, block_bytes)]
        if not blocks:
            return pa.table({})
        first = _parse_block(blocks[0], None)
        advance(blocks[0].size)
        tables = [first]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for block, table in zip(blocks[1:], pool.map(lambda b: _parse_block(b, first.schema), blocks[1:]),
                                    strict=True):  # fmt: skip
                tables.append(table)
                advance(block.size)
        return pa.concat_tables(tables, promote_options="permissive")


def _parse_block(block: pa.Buffer, schema: pa.Schema | None) -> pa.Table:
    parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
    read = pajson.ReadOptions(use_threads=False, block_size=max(block.size, 1))  # one block: no straddling line
    return pajson.read_json(pa.BufferReader(block), read_options=read, parse_options=parse)


def _line_blocks(data: pa.Buffer, size: int) -> list[tuple[int, int]]:
    """(start, stop) byte ranges of about `size` bytes each, every one ending just after a newline (or at EOF)."""
    view = np.frombuffer(data, dtype=np.uint8)
    ranges, start = [], 0
    while start < len(view):
        stop = min(start + size, len(view))
        while stop < len(view) and view[stop - 1] != ord("\n"):
            ahead = np.flatnonzero(view[stop : stop + (1 << 20)] == ord("\n"))
            stop = stop + int(ahead[0]) + 1 if ahead.size else min(stop + (1 << 20), len(view))
        ranges.append((start, stop))
        start = stop
    return ranges


class _Fallback(Exception):
    """The fast path found something it does not accept as is."""


def _column(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    array = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    if array.null_count:
        raise _Fallback
    return array


def _int_list(array: pa.Array, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [N, k], lengths [N]) of a list<int64> column with equal lengths and no nulls."""
    if not pa.types.is_list(array.type) or not pa.types.is_int64(array.type.value_type):
        raise _Fallback
    lengths = pc.list_value_length(array).to_numpy()
    values = pc.list_flatten(array)
    if values.null_count or lengths.min() < 1 or lengths.min() != lengths.max():
        raise _Fallback
    return values.to_numpy().reshape(rows, int(lengths[0])), lengths


def _checked_columns(table: pa.Table, names: set[str], num_experts: int | None) -> _Records:
    rows = table.num_rows
    pid = _column(table, "problem_id")
    if not (pa.types.is_int64(pid.type) or pa.types.is_string(pid.type)):
        raise _Fallback
    layer_col = _column(table, "layer")
    if not pa.types.is_int64(layer_col.type):
        raise _Fallback
    layer = layer_col.to_numpy()
    experts, _ = _int_list(_column(table, "experts"), rows)
    if layer.min() < 0 or experts.min() < 0:
        raise _Fallback
    if num_experts is not None and experts.max() >= num_experts:
        raise _Fallback
    ordered = np.sort(experts, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise _Fallback
    probs = None
    if "gating_probs" in names:
        column = _column(table, "gating_probs")  # present on some rows only: nulls -> fallback names the line
        if not pa.types.is_list(column.type) or not (
            pa.types.is_floating(column.type.value_type) or pa.types.is_int64(column.type.value_type)
        ):
            raise _Fallback
        lengths = pc.list_value_length(column).to_numpy()
        flat = pc.list_flatten(column)
        if flat.null_count or (lengths != experts.shape[1]).any():
            raise _Fallback
        probs = flat.to_numpy().astype(np.float64).reshape(experts.shape)
        if not ((probs >= 0) & (probs <= 1)).all():
            raise _Fallback
    token_idx = None
    if "token_idx" in names:
        column = table.column("token_idx")
        if not pa.types.is_int64(column.type):
            raise _Fallback
        if not column.null_count:
            token_idx = _column(table, "token_idx").to_numpy()
    encoded = pc.dictionary_encode(pid)  # codes in order of first appearance
    problem_ids = [str(v) for v in encoded.dictionary.to_pylist()]
    return _Records(
        problem=encoded.indices.to_numpy().astype(np.int64),
        problem_ids=problem_ids,
        layer=layer,
        experts=experts,
        probs=probs,
        token_idx=token_idx,
        datasets=_strings(table, names, "dataset"),
        models=_strings(table, names, "model"),
    )


def _strings(table: pa.Table, names: set[str], name: str) -> list[str]:
    if name not in names or not pa.types.is_string(table.column(name).type):
        return []
    return sorted(v for v in pc.unique(table.column(name)).to_pylist() if v)


# ------------------------------------------------------------------------------------------------ slow path


def _read_slow(path: Path, num_experts: int | None) -> _Records:
    """Line by line; raises TraceFormatError at the first malformed line."""
    problem, layer, experts, probs, tokens = [], [], [], [], []
    datasets: set[str] = set()
    models: set[str] = set()
    order: dict[Any, int] = {}
    with_probs: bool | None = None
    top_k: int | None = None
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            record = _parse_record(line, where)
            if with_probs is None:
                with_probs = "gating_probs" in record
            elif with_probs != ("gating_probs" in record):
                raise TraceFormatError(
                    f"{where}: gating_probs {'missing' if with_probs else 'present'} here but not on earlier records "
                    "(a log has weights on every record or on none)"
                )
            if top_k is None:
                top_k = len(record["experts"])
            elif len(record["experts"]) != top_k:
                raise TraceFormatError(f"{where}: {len(record['experts'])} experts, earlier records had {top_k}")
            if num_experts is not None and max(record["experts"]) >= num_experts:
                raise TraceFormatError(f"{where}: expert {max(record['experts'])} >= --num-experts {num_experts}")
            for key, found in (("dataset", datasets), ("model", models)):
                if isinstance(record.get(key), str) and record[key]:
                    found.add(record[key])
            problem.append(order.setdefault(record["problem_id"], len(order)))
            layer.append(record["layer"])
            experts.append(record["experts"])
            probs.append(record.get("gating_probs"))
            tokens.append(record.get("token_idx"))
    if top_k is None:
        raise TraceFormatError(f"{path}: no routing records (empty file)")
    return _Records(
        problem=np.asarray(problem, dtype=np.int64),
        problem_ids=[str(p) for p in order],
        layer=np.asarray(layer, dtype=np.int64),
        experts=np.asarray(experts, dtype=np.int64),
        probs=np.asarray(probs, dtype=np.float64) if with_probs else None,
        token_idx=None if any(t is None for t in tokens) else np.asarray(tokens, dtype=np.int64),
        datasets=sorted(datasets),
        models=sorted(models),
    )


def _parse_record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise TraceFormatError(f"{where}: expected a JSON object")
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise TraceFormatError(f"{where}: missing field(s) {', '.join(missing)}")
    pid, layer, experts = (record[key] for key in REQUIRED)
    if not isinstance(pid, int | str) or isinstance(pid, bool):
        raise TraceFormatError(f"{where}: problem_id must be an integer or a string")
    if not _is_int(layer) or layer < 0:
        raise TraceFormatError(f"{where}: layer must be a non-negative integer, got {layer!r}")
    if not isinstance(experts, list) or not experts or not all(_is_int(e) and e >= 0 for e in experts):
        raise TraceFormatError(f"{where}: experts must be a non-empty list of non-negative integers")
    if len(set(experts)) != len(experts):
        raise TraceFormatError(f"{where}: experts {experts} repeat an expert")
    if "gating_probs" in record:
        probs = record["gating_probs"]
        if (
            not isinstance(probs, list)
            or len(probs) != len(experts)
            or not all(isinstance(p, int | float) and not isinstance(p, bool) and 0 <= p <= 1 for p in probs)
        ):
            raise TraceFormatError(f"{where}: gating_probs must be {len(experts)} numbers in [0, 1]")
    if "token_idx" in record and not _is_int(record["token_idx"]):
        raise TraceFormatError(f"{where}: token_idx must be an integer")
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------ assembly


def _sequences(records: _Records, num_layers: int, path: Path) -> list[SequenceTrace]:
    key = records.problem * num_layers + records.layer
    order = np.argsort(key, kind="stable")  # grouped by (problem, layer), file order within a group
    sorted_key = key[order]
    group_start = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    group_of = np.repeat(np.arange(len(group_start)), np.diff(np.r_[group_start, len(order)]))
    rank = np.arange(len(order)) - group_start[group_of]
    prompt_len = _prompt_lengths(records, order, group_start, group_of, rank, path, num_layers)
    is_prompt = rank < prompt_len[group_of]
    step = rank - prompt_len[group_of]
    # sorted once: each problem's rows are one contiguous slice (the key sorts by problem first)
    layers, experts_all = records.layer[order], records.experts[order]
    probs_all = None if records.probs is None else records.probs[order]
    bounds = np.searchsorted(sorted_key, np.arange(len(records.problem_ids) + 1) * num_layers)
    k = records.experts.shape[1]
    sequences = []
    for p, prompt_id in enumerate(records.problem_ids):
        rows = slice(bounds[p], bounds[p + 1])
        prompt, lay, st, rk, ex = is_prompt[rows], layers[rows], step[rows], rank[rows], experts_all[rows]
        decode = ~prompt
        steps = int(st[decode].max()) + 1 if decode.any() else 0
        experts = np.full((steps, num_layers, k), -1, dtype=np.int16)
        experts[st[decode], lay[decode]] = ex[decode]
        weights = None
        if probs_all is not None:
            weights = np.full((steps, num_layers, k), np.nan, dtype=np.float32)  # NaN in absent cells
            weights[st[decode], lay[decode]] = probs_all[rows][decode]
        seq = SequenceTrace(experts=experts, weights=weights, prompt_id=prompt_id)
        if prompt.any():
            length = int(rk[prompt].max()) + 1
            seq.prefill_experts = np.zeros((length, num_layers, k), dtype=np.int16)
            seq.prefill_experts[rk[prompt], lay[prompt]] = ex[prompt]
            if probs_all is not None:
                seq.prefill_weights = np.zeros((length, num_layers, k), dtype=np.float32)
                seq.prefill_weights[rk[prompt], lay[prompt]] = probs_all[rows][prompt]
        sequences.append(seq)
    return sequences


def _prompt_lengths(
    records: _Records,
    order: np.ndarray,
    group_start: np.ndarray,
    group_of: np.ndarray,
    rank: np.ndarray,
    path: Path,
    num_layers: int,
) -> np.ndarray:
    """Per (problem, layer) group: how many leading rows are prompt rows (0 without a token_idx restart)."""
    lengths = np.zeros(len(group_start), dtype=np.int64)
    if records.token_idx is None:
        return lengths
    tok = records.token_idx[order]
    restart = np.r_[False, (tok[1:] < tok[:-1]) & (group_of[1:] == group_of[:-1])]
    counts = np.bincount(group_of[restart], minlength=len(group_start))
    problem_of_group = records.problem[order][group_start]
    layer_of_group = records.layer[order][group_start]
    if counts.max(initial=0) > 1:
        g = int(np.argmax(counts > 1))
        raise TraceFormatError(
            f"{path}: token_idx restarts {counts[g]} times in problem {records.problem_ids[problem_of_group[g]]} "
            f"layer {layer_of_group[g]}; cannot tell prompt rows from decode rows"
        )
    lengths[group_of[restart]] = rank[restart]
    for p in np.unique(problem_of_group[lengths > 0]):
        groups = problem_of_group == p
        found = set(lengths[groups].tolist())
        if len(found) != 1 or groups.sum() != num_layers:
            raise TraceFormatError(
                f"{path}: problem {records.problem_ids[p]} has prompt rows before its decode rows (token_idx "
                f"restarts), but its layers disagree on the prompt length ({sorted(found)}); cannot split it"
            )
    return lengths
