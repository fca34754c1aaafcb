"""Expert activation traces: the in-memory contract, the versioned file format, the recorder, trace specs.

A ``Trace`` holds ``TraceMeta`` and a list of ``SequenceTrace``. Per sequence, decode arrays are indexed
[step, layer, ...]; prefill arrays [prompt_token, layer, ...]. A cell whose experts are all -1 is absent (the
source dropped it; replay skips it). Absent signals (full gate logits, lookahead logits) are None, never invented.

File format (docs/trace-format.md): one zip archive (a valid ``.npz``) holding ``meta.json`` and one ``.npy``
member per array (``seq00000/experts.npy`` ...). Zip members carry CRC-32, so a corrupt or truncated file is
refused on read; writes are atomic. Logits and weights are stored as float16, everything else exactly.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from moe_env.atomic import atomic_write
from moe_env.embedded import EMBEDDED_MODELS
from moe_env.errors import TraceFormatError, UsageError
from moe_env.routing import LayerRouting

TRACE_FORMAT_VERSION = 1
FORMAT_NAME = "moe-env-trace"
BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "eval")


@dataclass
class TraceMeta:
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    source: str  # "record" (moe-env record) or "convert:<format>"
    config_hash: str = ""
    expert_bytes: int = 0  # bytes of one expert as recorded (0: unknown)
    version: int = TRACE_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SequenceTrace:
    """One sequence. Shapes: experts [T, L, k] int16; weights [T, L, k] float32; logits [T, L, E] float32."""

    experts: np.ndarray
    weights: np.ndarray | None = None
    gate_logits: np.ndarray | None = None
    lookahead_logits: np.ndarray | None = None  # last layer's row is NaN (there is no next layer)
    prefill_experts: np.ndarray | None = None  # [P, L, k]
    prefill_weights: np.ndarray | None = None
    prompt_ids: np.ndarray | None = None  # [P] int32
    output_ids: np.ndarray | None = None  # [T + 1] int32: the generated tokens
    prompt_id: str = ""  # name of the prompt in its prompt set
    split: str = ""  # "train" / "eval" / ""
    # the prefill's signals are those of the last prompt token (all that route_events uses): [L, E]
    prefill_gate_logits: np.ndarray | None = None
    prefill_lookahead_logits: np.ndarray | None = None  # last layer's row is NaN

    @property
    def num_steps(self) -> int:
        return int(self.experts.shape[0])

    def routings(self) -> Iterator[LayerRouting]:
        """LayerRoutings in the order a decode loop produces them: prefill layer by layer, then step by step."""
        num_layers = self.experts.shape[1]
        if self.prefill_experts is not None and len(self.prefill_experts):
            for layer in range(num_layers):
                yield LayerRouting(
                    layer=layer,
                    step=-1,
                    experts=self.prefill_experts[:, layer],
                    weights=None if self.prefill_weights is None else self.prefill_weights[:, layer],
                    gate_logits=_row(self.prefill_gate_logits, layer, num_layers, lookahead=False),
                    lookahead_logits=_row(self.prefill_lookahead_logits, layer, num_layers, lookahead=True),
                )
        tokens = self.output_ids  # step t consumes output_ids[t]
        for step in range(self.num_steps):
            for layer in range(num_layers):
                experts = self.experts[step, layer]
                if experts[0] < 0:
                    continue  # absent cell
                yield LayerRouting(
                    layer=layer,
                    step=step,
                    experts=experts[None, :],
                    weights=None if self.weights is None else self.weights[step, layer][None, :],
                    gate_logits=None if self.gate_logits is None else self.gate_logits[step, layer][None, :],
                    lookahead_logits=(
                        None
                        if self.lookahead_logits is None or layer + 1 >= num_layers
                        else self.lookahead_logits[step, layer][None, :]
                    ),
                    token=None if tokens is None or step >= len(tokens) else int(tokens[step]),
                )


def _row(per_layer: np.ndarray | None, layer: int, num_layers: int, lookahead: bool) -> np.ndarray | None:
    if per_layer is None or (lookahead and layer + 1 >= num_layers):
        return None
    return per_layer[layer][None, :]


@dataclass
class Trace:
    meta: TraceMeta
    sequences: list[SequenceTrace]

    def split(self, name: str) -> Trace:
        """The sequences of one split ("train"/"eval"); all of them for ""."""
        if not name:
            return self
        return Trace(self.meta, [s for s in self.sequences if s.split == name])

    @property
    def num_accesses(self) -> int:
        return int(sum((s.experts[:, :, 0] >= 0).sum() * self.meta.top_k for s in self.sequences))

    @property
    def num_steps(self) -> int:
        return sum(s.num_steps for s in self.sequences)


# ------------------------------------------------------------------------------------------------ validation

# array name -> (kind, symbolic shape, dtype in the file, dtype in memory). Symbols: T decode steps, P prompt
# tokens, N generated tokens (free), L layers, k top-k, E experts; L, k, E come from the meta.
_ARRAYS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "experts": ("int", ("T", "L", "k"), "int16", "int16"),
    "weights": ("float", ("T", "L", "k"), "float16", "float32"),
    "gate_logits": ("float", ("T", "L", "E"), "float16", "float32"),
    "lookahead_logits": ("float", ("T", "L", "E"), "float16", "float32"),
    "prefill_experts": ("int", ("P", "L", "k"), "int16", "int16"),
    "prefill_weights": ("float", ("P", "L", "k"), "float16", "float32"),
    "prefill_gate_logits": ("float", ("L", "E"), "float16", "float32"),
    "prefill_lookahead_logits": ("float", ("L", "E"), "float16", "float32"),
    "prompt_ids": ("int", ("P",), "int32", "int32"),
    "output_ids": ("int", ("N",), "int32", "int32"),
}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _sequence_arrays(seq: SequenceTrace) -> dict[str, np.ndarray]:
    return {name: getattr(seq, name) for name in _ARRAYS if getattr(seq, name) is not None}


def _check_meta(meta: TraceMeta, where: str) -> None:
    for name in ("model", "source", "config_hash"):
        if not isinstance(getattr(meta, name), str):
            raise TraceFormatError(f"{where}: meta.{name} must be a string, got {getattr(meta, name)!r}")
    for name in ("num_layers", "num_experts", "top_k"):
        value = getattr(meta, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TraceFormatError(f"{where}: meta.{name} must be a positive integer, got {value!r}")
    if meta.top_k > meta.num_experts:
        raise TraceFormatError(f"{where}: meta.top_k={meta.top_k} exceeds meta.num_experts={meta.num_experts}")
    if meta.num_experts > np.iinfo(np.int16).max:
        raise TraceFormatError(f"{where}: {meta.num_experts} experts do not fit the int16 expert ids")
    if not isinstance(meta.expert_bytes, int) or meta.expert_bytes < 0:
        raise TraceFormatError(f"{where}: meta.expert_bytes must be a non-negative integer")
    if not isinstance(meta.extra, dict):
        raise TraceFormatError(f"{where}: meta.extra must be a JSON object")


def _check_sequence(seq: SequenceTrace, meta: TraceMeta, where: str) -> None:
    """Shapes, dtypes and value ranges of one sequence; raises TraceFormatError naming the first problem."""
    _check_layout(seq, meta, where)
    _check_values(_sequence_arrays(seq), meta, where)


def _check_layout(seq: SequenceTrace, meta: TraceMeta, where: str) -> None:
    """Everything but the values: arrays present, dtypes, shapes against the meta and each other, names."""
    if seq.experts is None:
        raise TraceFormatError(f"{where}: the experts array is missing")
    dims = {"L": meta.num_layers, "k": meta.top_k, "E": meta.num_experts}
    for name, array in _sequence_arrays(seq).items():
        kind, shape, _, _ = _ARRAYS[name]
        if not isinstance(array, np.ndarray):
            raise TraceFormatError(f"{where}: {name} must be a numpy array, got {type(array).__name__}")
        ok_dtype = np.issubdtype(array.dtype, np.integer) if kind == "int" else np.issubdtype(array.dtype, np.floating)
        if not ok_dtype:
            raise TraceFormatError(f"{where}: {name} must be {kind}, got dtype {array.dtype}")
        if array.ndim != len(shape):
            raise TraceFormatError(f"{where}: {name} must have shape [{', '.join(shape)}], got {list(array.shape)}")
        for symbol, size in zip(shape, array.shape, strict=True):
            expected = dims.setdefault(symbol, size)
            if size != expected:
                raise TraceFormatError(
                    f"{where}: {name} has shape {list(array.shape)}, expected {symbol}={expected} "
                    f"(shape [{', '.join(shape)}] with L={meta.num_layers}, k={meta.top_k}, E={meta.num_experts})"
                )
    prefill_signals = (seq.prefill_weights, seq.prefill_gate_logits, seq.prefill_lookahead_logits)
    if seq.prefill_experts is None and any(signal is not None for signal in prefill_signals):
        raise TraceFormatError(f"{where}: prefill signals without prefill_experts")
    if not isinstance(seq.prompt_id, str) or not isinstance(seq.split, str):
        raise TraceFormatError(f"{where}: prompt_id and split must be strings")


def _check_values(arrays: dict[str, np.ndarray], meta: TraceMeta, where: str) -> None:
    """Value ranges of a sequence's arrays (or of several sequences' arrays joined along their first axis: every
    check is per cell or per element, so joining keeps its verdict)."""
    for name in ("experts", "prefill_experts"):
        experts = arrays.get(name)
        if experts is None or experts.size == 0:
            continue
        low = -1 if name == "experts" else 0  # prefill has no absent cells
        if experts.min() < low or experts.max() >= meta.num_experts:
            raise TraceFormatError(
                f"{where}: {name} holds ids in [{experts.min()}, {experts.max()}], "
                f"expected {low}..{meta.num_experts - 1}"
            )
        absent = experts < 0
        if (absent != absent[..., :1]).any():  # flat reductions: per-cell ones over a tiny top-k axis cost more
            raise TraceFormatError(f"{where}: {name} has partly absent cells (a cell is all -1 or all valid)")
        if _has_repeat(experts, absent[..., 0]):
            ordered = np.sort(experts, axis=-1)  # the slow way, to name the first such cell
            repeats = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
            cell = tuple(int(i) for i in np.argwhere(repeats)[0][:-1])
            raise TraceFormatError(
                f"{where}: {name}{list(cell)} routes to expert {int(ordered[cell][1:][repeats[cell]][0])} twice "
                "(a cell's top-k experts must be distinct)"
            )
    for name in ("prompt_ids", "output_ids"):
        ids = arrays.get(name)
        if ids is not None and ids.size and ids.min() < 0:
            raise TraceFormatError(f"{where}: {name} holds negative token ids")
    for name, array in arrays.items():
        if _ARRAYS[name][0] != "float":
            continue
        large = np.abs(array) > _FLOAT16_MAX  # infinities are allowed (masked logits), NaN compares False
        if large.any() and np.isfinite(array[large]).any():
            raise TraceFormatError(f"{where}: {name} exceeds the float16 range of the file format (|x| > 65504)")


def _has_repeat(experts: np.ndarray, absent: np.ndarray) -> bool:
    """Whether a present cell (not `absent`; absent cells are all -1) routes to one expert twice. Every pair of
    top-k columns is compared over all cells at once: contiguous columns make that about 9x cheaper than sorting
    each cell for the top-k of MoE models (up to 16; above that, sorting costs less)."""
    flat = experts.reshape(-1, experts.shape[-1])
    if absent.any():
        flat = flat[~absent.reshape(-1)]
    top_k = flat.shape[1]
    if top_k > 16:
        ordered = np.sort(flat, axis=-1)
        return bool((ordered[:, 1:] == ordered[:, :-1]).any())
    columns = [np.ascontiguousarray(flat[:, column]) for column in range(top_k)]
    return any(bool((columns[a] == columns[b]).any()) for a in range(top_k) for b in range(a + 1, top_k))


def validate_trace(trace: Trace, where: str = "trace") -> None:
    """Raise TraceFormatError if `trace` is not a consistent trace (the same checks as reading a file).

    The id arrays are checked once over every sequence's arrays joined (numpy's per-call cost, paid per
    sequence, was most of an import of many short sequences); the float arrays, the large ones (logits are
    [T, L, E]), per sequence, so no copy of them is made. Only when a check fails are the sequences checked one
    by one, so the error still names the first bad sequence and cell."""
    _check_meta(trace.meta, where)
    for i, seq in enumerate(trace.sequences):
        _check_layout(seq, trace.meta, f"{where}: sequence {i}")
    per_sequence = [_sequence_arrays(seq) for seq in trace.sequences]
    ids = {name for arrays in per_sequence for name in arrays if _ARRAYS[name][0] == "int"}
    joined = {
        name: np.concatenate([arrays[name] for arrays in per_sequence if name in arrays]) for name in ids
    }  # dtypes may differ between sequences (int16/int32 ids): concatenate promotes, which keeps every value
    try:
        _check_values(joined, trace.meta, where)
        for arrays in per_sequence:
            _check_values({name: a for name, a in arrays.items() if name not in ids}, trace.meta, where)
    except TraceFormatError:
        for i, arrays in enumerate(per_sequence):
            _check_values(arrays, trace.meta, f"{where}: sequence {i}")
        raise


def _member(index: int, name: str) -> str:
    return f"seq{index:05d}/{name}.npy"


def save_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Validate `trace` and write it to `path` atomically (temp file in the same directory, fsync, replace)."""
    path = Path(path)
    validate_trace(trace, str(path))
    meta = asdict(trace.meta) | {"version": TRACE_FORMAT_VERSION}
    header = {
        "format": FORMAT_NAME,
        "version": TRACE_FORMAT_VERSION,
        "meta": meta,
        "sequences": [
            {"prompt_id": s.prompt_id, "split": s.split, "arrays": sorted(_sequence_arrays(s))} for s in trace.sequences
        ],
    }
    try:
        header_bytes = json.dumps(header, indent=1, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TraceFormatError(f"{path}: meta.extra is not JSON-serialisable ({exc})") from None
    try:
        _write_atomically(path, header_bytes, trace.sequences)
    except OSError as exc:
        raise UsageError(f"cannot write the trace to {path}: {exc.strerror or exc}") from None
    return path


def _write_atomically(path: Path, header_bytes: bytes, sequences: list[SequenceTrace]) -> None:
    """Readers see the old file or the new one; a killed write's temp file is removed by the next write."""
    with (
        atomic_write(path) as raw,
        zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
    ):
        archive.writestr("meta.json", header_bytes)
        for i, seq in enumerate(sequences):
            for name, array in _sequence_arrays(seq).items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.ascontiguousarray(array, dtype=_ARRAYS[name][2]))
                archive.writestr(_member(i, name), buffer.getvalue())


_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, struct.error, NotImplementedError)


def read_trace_file(path: str | os.PathLike) -> Trace:
    """Read and fully validate a trace file; a corrupt, truncated, wrong-version or inconsistent file raises
    TraceFormatError (nothing is returned half-loaded)."""
    path = Path(path)
    if not path.is_file():
        raise TraceFormatError(f"{path}: {'not a file' if path.exists() else 'no such trace file'}")
    try:
        with zipfile.ZipFile(path) as archive:
            header = _read_header(archive, path)
            meta = _meta_from_header(header, path)
            sequences = [_read_sequence(archive, i, entry, meta, path) for i, entry in enumerate(header["sequences"])]
    except TraceFormatError:
        raise
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read the trace file ({exc.strerror or exc})") from None
    except _CORRUPT as exc:
        raise TraceFormatError(
            f"{path}: corrupt or truncated trace file ({type(exc).__name__}: {exc}); re-record or re-convert it"
        ) from None
    return Trace(meta, sequences)


def _read_header(archive: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    try:
        raw = archive.read("meta.json")
    except KeyError:
        raise TraceFormatError(f"{path}: not a moe-env trace (no meta.json member)") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceFormatError(f"{path}: meta.json is not valid JSON ({exc}); re-record or re-convert it") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"{path}: not a moe-env trace (meta.json lacks format={FORMAT_NAME!r})")
    version = header.get("version")
    if version != TRACE_FORMAT_VERSION:
        raise TraceFormatError(
            f"{path}: trace format version {version!r} is not supported (this moe-env reads version "
            f"{TRACE_FORMAT_VERSION}); re-record or re-convert it with this moe-env"
        )
    if not isinstance(header.get("meta"), dict) or not isinstance(header.get("sequences"), list):
        raise TraceFormatError(f"{path}: meta.json lacks the 'meta' object or the 'sequences' list")
    return header


def _meta_from_header(header: dict[str, Any], path: Path) -> TraceMeta:
    known = {f.name for f in fields(TraceMeta)}
    raw = header["meta"]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TraceFormatError(f"{path}: meta.json has unknown meta fields {unknown}")
    try:
        meta = TraceMeta(**raw)
    except TypeError as exc:
        raise TraceFormatError(f"{path}: meta.json: {exc}") from None
    _check_meta(meta, str(path))
    return meta


def _read_sequence(archive: zipfile.ZipFile, index: int, entry: Any, meta: TraceMeta, path: Path) -> SequenceTrace:
    where = f"{path}: sequence {index}"
    if not isinstance(entry, dict) or not isinstance(entry.get("arrays"), list):
        raise TraceFormatError(f"{where}: malformed entry in meta.json")
    names = entry["arrays"]
    unknown = sorted(set(map(str, names)) - set(_ARRAYS))
    if unknown or "experts" not in names:
        raise TraceFormatError(f"{where}: array list {names} must include 'experts' and only known arrays")
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        member = _member(index, name)
        try:
            data = archive.read(member)  # reads the whole member: zipfile checks its CRC-32
        except KeyError:
            raise TraceFormatError(f"{where}: member {member} is missing; the file is incomplete") from None
        array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        if array.dtype != np.dtype(_ARRAYS[name][2]):
            raise TraceFormatError(f"{where}: {name} is stored as {array.dtype}, expected {_ARRAYS[name][2]}")
        arrays[name] = array.astype(_ARRAYS[name][3])
    seq = SequenceTrace(**arrays, prompt_id=entry.get("prompt_id", ""), split=entry.get("split", ""))
    _check_sequence(seq, meta, where)
    return seq


# ------------------------------------------------------------------------------------------------ specs


def builtin_traces_dir() -> Path:
    """Where the shipped traces live: moe_env/assets/traces/<model>.npz."""
    return Path(__file__).resolve().parent / "assets" / "traces"


def load_trace(spec: str | os.PathLike, builtin_dir: Path | None = None) -> Trace:
    """A trace from a spec: a trace file, an external routing log converted on the fly (a ``.jsonl`` file, a
    ``.csv`` file or a directory of per-prompt CSVs), or ``builtin:MODEL[/SPLIT]`` naming a shipped trace (SPLIT:
    train or eval; all sequences without it); any of them followed by a sequence selection ``#0,2,5-9`` or
    ``#id=1-800`` (moe_env.trace_select)."""
    # the importers and the selection build on this module: imported here, not at the top, to avoid a cycle
    from moe_env.trace_select import select_sequences, split_spec

    text = os.fspath(spec)
    base, selection = (text, "") if Path(text).exists() else split_spec(text)
    return select_sequences(_load_unselected(base, builtin_dir), selection, base)


def _load_unselected(text: str, builtin_dir: Path | None) -> Trace:
    if text.startswith(BUILTIN_PREFIX):
        return _load_builtin(text[len(BUILTIN_PREFIX) :], builtin_dir or builtin_traces_dir())
    path = Path(text)
    if not path.exists():
        raise UsageError(
            f"no such trace: {text!r} (give a trace file, a .jsonl or .csv routing log, a directory of .csv logs "
            "or builtin:MODEL[/SPLIT], optionally followed by #SELECTION)"
        )
    if path.is_dir() or path.suffix == ".csv":
        from moe_env.trace_csv import import_csv_routing

        return import_csv_routing(path)
    if path.suffix == ".jsonl":
        from moe_env.trace_jsonl import import_jsonl_routing

        return import_jsonl_routing(path)
    return read_trace_file(path)


def builtin_trace_names(builtin_dir: Path | None = None) -> list[str]:
    directory = builtin_dir or builtin_traces_dir()
    return sorted(p.stem for p in directory.glob("*.npz")) if directory.is_dir() else []


def _load_builtin(name: str, directory: Path) -> Trace:
    model, _, split = name.partition("/")
    available = builtin_trace_names(directory)
    if model in EMBEDDED_MODELS and model not in available:
        raise UsageError(
            f"the shipped trace of {model} is missing; record it: moe-env record --model {model} --prompts builtin "
            f"--max-new-tokens 64 --out {directory / (model + '.npz')}"
        )
    if not model or model not in available:
        listing = ", ".join(available) or "none (record them: see docs/trace-format.md)"
        raise UsageError(f"no built-in trace {model!r}; available: {listing}")
    if split and split not in SPLITS:
        raise UsageError(f"unknown split {split!r} in builtin:{name}; use {' or '.join(SPLITS)}, or omit it for all")
    return read_trace_file(directory / f"{model}.npz").split(split)


# ------------------------------------------------------------------------------------------------ recorder


class TraceRecorder:
    """Assembles SequenceTraces from the LayerRouting stream of a decode loop (the engine's observer).

    Per sequence: ``on_sequence_start(prompt_ids)``, then every LayerRouting (prefill: step -1 with all prompt
    tokens; decode: one token per call), then ``on_sequence_end(output_ids)``. ``label(prompt_id, split)`` names
    the next sequence. Decode cells that never arrive stay absent (-1); signals never seen stay None.
    """

    def __init__(self, meta: TraceMeta):
        _check_meta(meta, "recorder")
        self.meta = meta
        self.sequences: list[SequenceTrace] = []
        self._label = ("", "")
        self._prompt_ids: np.ndarray | None = None
        self._prefill: dict[int, LayerRouting] = {}
        self._decode: dict[tuple[int, int], LayerRouting] = {}
        self._active = False

    def label(self, prompt_id: str, split: str = "") -> None:
        self._label = (prompt_id, split)

    def on_sequence_start(self, prompt_ids: Sequence[int] | np.ndarray | None = None, **_: Any) -> None:
        if self._active:
            raise RuntimeError("TraceRecorder: on_sequence_start before the previous sequence ended")
        self._active = True
        self._prompt_ids = None if prompt_ids is None else np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        self._prefill.clear()
        self._decode.clear()

    def __call__(self, routing: LayerRouting) -> None:
        if not self._active:
            raise RuntimeError("TraceRecorder: a routing arrived outside a sequence (call on_sequence_start)")
        if not 0 <= routing.layer < self.meta.num_layers:
            raise ValueError(f"TraceRecorder: layer {routing.layer} outside 0..{self.meta.num_layers - 1}")
        experts = np.asarray(routing.experts)
        if experts.ndim != 2 or experts.shape[1] != self.meta.top_k:
            raise ValueError(f"TraceRecorder: experts must be [n, {self.meta.top_k}], got {list(experts.shape)}")
        if routing.prefill:
            if routing.layer in self._prefill:
                raise ValueError(f"TraceRecorder: layer {routing.layer} prefilled twice in one sequence")
            self._prefill[routing.layer] = routing
            return
        if experts.shape[0] != 1:
            raise ValueError(f"TraceRecorder: a decode routing must hold one token, got {experts.shape[0]}")
        key = (routing.step, routing.layer)
        if key in self._decode:
            raise ValueError(f"TraceRecorder: step {routing.step} layer {routing.layer} routed twice")
        self._decode[key] = routing

    def on_sequence_end(self, output_ids: Sequence[int] | np.ndarray | None = None, **_: Any) -> SequenceTrace:
        if not self._active:
            raise RuntimeError("TraceRecorder: on_sequence_end without on_sequence_start")
        self._active = False
        seq = self._assemble(output_ids)
        seq.prompt_id, seq.split = self._label
        self._label = ("", "")
        _check_sequence(seq, self.meta, f"recorded sequence {len(self.sequences)}")
        self.sequences.append(seq)
        return seq

    def trace(self) -> Trace:
        return Trace(self.meta, list(self.sequences))

    def _assemble(self, output_ids: Sequence[int] | np.ndarray | None) -> SequenceTrace:
        num_layers, k, num_experts = self.meta.num_layers, self.meta.top_k, self.meta.num_experts
        steps = 1 + max((step for step, _ in self._decode), default=-1)
        experts = np.full((steps, num_layers, k), -1, dtype=np.int16)
        weights = _filled_if(self._decode.values(), "weights", (steps, num_layers, k))
        gate = _filled_if(self._decode.values(), "gate_logits", (steps, num_layers, num_experts))
        look = _filled_if(self._decode.values(), "lookahead_logits", (steps, num_layers, num_experts))
        for (step, layer), r in self._decode.items():
            experts[step, layer] = np.asarray(r.experts)[0]
            for target, value in ((weights, r.weights), (gate, r.gate_logits), (look, r.lookahead_logits)):
                if target is not None and value is not None:
                    target[step, layer] = np.asarray(value)[-1]
        seq = SequenceTrace(
            experts=experts,
            weights=weights,
            gate_logits=gate,
            lookahead_logits=look,
            prompt_ids=None if self._prompt_ids is None else self._prompt_ids.astype(np.int32),
            output_ids=None if output_ids is None else np.asarray(output_ids, dtype=np.int32).reshape(-1),
        )
        if self._prefill:
            self._assemble_prefill(seq)
        return seq

    def _assemble_prefill(self, seq: SequenceTrace) -> None:
        num_layers, num_experts = self.meta.num_layers, self.meta.num_experts
        missing = sorted(set(range(num_layers)) - set(self._prefill))
        if missing:
            raise ValueError(f"TraceRecorder: prefill routed no tokens for layers {missing}")
        tokens = {np.asarray(r.experts).shape[0] for r in self._prefill.values()}
        if len(tokens) != 1:
            raise ValueError(f"TraceRecorder: prefill layers saw different token counts {sorted(tokens)}")
        routings = [self._prefill[layer] for layer in range(num_layers)]
        seq.prefill_experts = np.stack([np.asarray(r.experts) for r in routings], axis=1).astype(np.int16)
        if all(r.weights is not None for r in routings):
            seq.prefill_weights = np.stack([np.asarray(r.weights) for r in routings], axis=1).astype(np.float32)
        seq.prefill_gate_logits = _last_rows(routings, "gate_logits", num_experts)
        seq.prefill_lookahead_logits = _last_rows(routings, "lookahead_logits", num_experts)


def _filled_if(routings: Any, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """A NaN-filled float32 array of `shape` if any routing carries `name`, else None (never invented)."""
    if all(getattr(r, name) is None for r in routings):
        return None
    return np.full(shape, np.nan, dtype=np.float32)


def _last_rows(routings: list[LayerRouting], name: str, num_experts: int) -> np.ndarray | None:
    rows = [getattr(r, name) for r in routings]
    if all(row is None for row in rows):
        return None
    out = np.full((len(rows), num_experts), np.nan, dtype=np.float32)
    for layer, row in enumerate(rows):
        if row is not None:
            out[layer] = np.asarray(row)[-1]
    return out
