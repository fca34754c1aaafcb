"""Per-model prior statistics for the learned policies, built from a TRAINING split only (never eval).

A ``ModelTables`` holds popularity [L, E], same-layer transitions [L, E, E], inter-layer co-activation [L, E, E]
and a token -> expert table [V, L, E] for the tokens seen at least ``min_token_count`` times (the rest are
absent: the token feature is then "missing", never invented). Files are ``.npz`` with a CRC of the arrays, so
a damaged file is refused, never half-loaded. The shipped ones sit in moe_env/assets/policies/tables-*.npz and
are found by the model's shape (layers, experts, top-k).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
from moe_env.agents.candidate_features import ModelTables, token_key

from moe_env.atomic import atomic_write
from moe_env.errors import CheckpointError
from moe_env.policy import ModelSpec
from moe_env.trace import SequenceTrace, Trace

FORMAT = "moe-env-model-tables"
ARRAYS = ("popularity", "transition", "coactivation", "token_keys", "token_counts", "next_counts")


def sequence_tokens(sequence: SequenceTrace, vocab: list | None = None) -> list[int | None]:
    """The key of each decode step's input token (step t consumes output_ids[t]; with the import's `vocab`, the
    key of the token's text, as the simulator hands it to policies); None where unknown."""
    ids = sequence.output_ids
    steps = sequence.num_steps
    if ids is None:
        return [None] * steps
    keys: list[int | None] = []
    for t in range(steps):
        if t >= len(ids):
            keys.append(None)
        elif vocab is not None and 0 <= int(ids[t]) < len(vocab):
            keys.append(token_key(str(vocab[int(ids[t])])))
        else:
            keys.append(token_key(int(ids[t])))
    return keys


def build_tables(trace: Trace, min_token_count: int = 3, max_tokens: int = 500) -> ModelTables:
    """Counts over every decode step of `trace` (a training split)."""
    meta = trace.meta
    num_layers, num_experts, top_k = meta.num_layers, meta.num_experts, meta.top_k
    popularity = np.zeros((num_layers, num_experts))
    transition = np.zeros((num_layers, num_experts, num_experts))
    coactivation = np.zeros((num_layers, num_experts, num_experts))
    token_counts: dict[int, np.ndarray] = {}
    next_counts: dict[int, np.ndarray] = {}
    token_seen: dict[int, int] = {}
    layer_ids = np.arange(num_layers)[None, :, None]
    vocab = meta.extra.get("vocab") if isinstance(meta.extra, dict) else None
    vocab = vocab if isinstance(vocab, list) else None
    for sequence in trace.sequences:
        experts = sequence.experts.astype(np.int64)  # [T, L, k]
        present = experts[:, :, 0] >= 0
        cells = np.broadcast_to(layer_ids, experts.shape)
        np.add.at(popularity, (cells[present], experts[present]), 1)
        both = present[1:] & present[:-1]  # same layer, consecutive steps
        _add_pairs(transition, np.nonzero(both)[1], experts[:-1][both], experts[1:][both])
        stacked = present[:, 1:] & present[:, :-1]  # same step, consecutive layers
        _add_pairs(coactivation, np.nonzero(stacked)[1] + 1, experts[:, :-1][stacked], experts[:, 1:][stacked])
        tokens = sequence_tokens(sequence, vocab)
        for t, key in enumerate(tokens):
            if key is None:
                continue
            counts = token_counts.get(key)
            if counts is None:
                counts = token_counts[key] = np.zeros((num_layers, num_experts))
            token_seen[key] = token_seen.get(key, 0) + 1
            ok = present[t]
            rows = np.broadcast_to(np.arange(num_layers)[:, None], experts[t].shape)
            np.add.at(counts, (rows[ok], experts[t][ok]), 1)
            if t + 1 < len(tokens):  # what the NEXT forward pass routes to, given this input token
                after = next_counts.get(key)
                if after is None:
                    after = next_counts[key] = np.zeros((num_layers, num_experts))
                ok = present[t + 1]
                np.add.at(after, (rows[ok], experts[t + 1][ok]), 1)
    frequent = sorted((k for k, n in token_seen.items() if n >= min_token_count), key=lambda k: -token_seen[k])
    frequent = frequent[:max_tokens]
    return ModelTables(
        num_layers, num_experts, top_k,
        popularity=popularity.astype(np.float32),
        transition=transition.astype(np.float32),
        coactivation=coactivation.astype(np.float32),
        token_keys=np.asarray(frequent, dtype=np.int64),
        token_counts=_stack(token_counts, frequent, num_layers, num_experts),
        next_counts=_stack(next_counts, frequent, num_layers, num_experts),
    )  # fmt: skip


def _stack(counts: dict[int, np.ndarray], keys: list[int], num_layers: int, num_experts: int) -> np.ndarray:
    empty = np.zeros((num_layers, num_experts))
    rows = [counts.get(k, empty) for k in keys]
    return (np.stack(rows) if rows else np.zeros((0, num_layers, num_experts))).astype(np.float32)


def _add_pairs(table: np.ndarray, layers: np.ndarray, before: np.ndarray, after: np.ndarray) -> None:
    """table[layer, b, a] += 1 for every expert b of `before` and a of `after` (rows [n, k] per cell)."""
    k = before.shape[1]
    np.add.at(table, (np.repeat(layers, k * k), np.repeat(before, k, axis=1).reshape(-1),
                      np.tile(after, (1, k)).reshape(-1)), 1)  # fmt: skip


def _stored(tables: ModelTables) -> dict[str, np.ndarray]:
    """Counts as float16 (small files); keys as int64."""
    return {
        "popularity": tables.popularity.astype(np.float32),
        "transition": tables.transition.astype(np.float16),
        "coactivation": tables.coactivation.astype(np.float16),
        "token_keys": tables.token_keys.astype(np.int64),
        "token_counts": tables.token_counts.astype(np.float16),
        "next_counts": (tables.next_counts if tables.next_counts is not None else tables.token_counts * 0).astype(
            np.float16
        ),
    }


def _crc(arrays: dict[str, np.ndarray]) -> int:
    crc = 0
    for name in ARRAYS:
        crc = zlib.crc32(np.ascontiguousarray(arrays[name]).tobytes(), crc)
    return crc


def save_tables(tables: ModelTables, path: str | os.PathLike, model: str = "") -> Path:
    """Atomic, compressed, with a CRC of the arrays."""
    path = Path(path)  # atomic_write makes the directory
    arrays = _stored(tables)
    header = {"format": FORMAT, "model": model, "shape": list(tables.shape), "crc": _crc(arrays)}
    with atomic_write(path, mode=0o644) as handle:
        np.savez_compressed(handle, header=np.array(json.dumps(header)), **arrays)
    return path


def load_tables(path: str | os.PathLike, spec: ModelSpec | None = None) -> ModelTables:
    """Read and validate; refuse a damaged file or one for another shape than `spec`'s."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such model tables file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            arrays = {name: data[name] for name in ARRAYS}
    except Exception as exc:  # zipfile, numpy and json raise many types for a damaged file
        raise CheckpointError(f"{path}: not readable model tables ({type(exc).__name__})") from None
    if header.get("format") != FORMAT or header.get("crc") != _crc(arrays):
        raise CheckpointError(f"{path}: damaged or foreign model tables (format/CRC mismatch)")
    num_layers, num_experts, top_k = (int(x) for x in header["shape"])
    if spec is not None and (spec.num_layers, spec.num_experts, spec.top_k) != (num_layers, num_experts, top_k):
        raise CheckpointError(
            f"{path}: tables for (layers, experts, top-k) = {(num_layers, num_experts, top_k)}, this model has "
            f"{(spec.num_layers, spec.num_experts, spec.top_k)}"
        )
    expected = {
        "popularity": (num_layers, num_experts),
        "transition": (num_layers, num_experts, num_experts),
        "coactivation": (num_layers, num_experts, num_experts),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape or not np.isfinite(arrays[name]).all():
            raise CheckpointError(f"{path}: array {name} has shape {arrays[name].shape}, expected {shape}")
    keys, counts = arrays["token_keys"], arrays["token_counts"]
    if counts.shape != (len(keys), num_layers, num_experts) or arrays["next_counts"].shape != counts.shape:
        raise CheckpointError(f"{path}: token table of shape {counts.shape} for {len(keys)} tokens")
    return ModelTables(num_layers, num_experts, top_k, arrays["popularity"], arrays["transition"],
                       arrays["coactivation"], keys, counts, arrays["next_counts"])  # fmt: skip


def shipped_tables_dir() -> Path:
    import moe_env

    return Path(moe_env.__file__).resolve().parent / "assets" / "policies"


def find_shipped_tables(spec: ModelSpec) -> ModelTables | None:
    """The shipped tables of the model's shape, if any (the shape identifies the model family's routing)."""
    for path in sorted(shipped_tables_dir().glob("tables-*.npz")):
        try:
            with np.load(path, allow_pickle=False) as data:
                shape = json.loads(str(data["header"]))["shape"]
        except Exception:
            continue  # a damaged shipped file is reported when loaded by name, not here
        if tuple(shape) == (spec.num_layers, spec.num_experts, spec.top_k):
            return load_tables(path, spec)
    return None
