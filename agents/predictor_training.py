"""Training data of the set predictor: cross-fitted samples from a training split, their files, resume state.

``collect_training`` replays the training sequences through ``PredictionFeatures`` in three groups, so the rows
cover what the shipped checkpoint meets: half of the rest with model tables built from the other half (a row
never sees its own routing in a table: the honest picture of a table learned on other prompts), the other half
the other way round, and a share ``no_tables_share`` with online statistics only (a model without shipped
tables); a share ``token_dropout`` of the sequences have their tokens hidden (logs without tokens).
Validation rows use tables of the whole training split, as deployment does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from moe_env.agents.candidate_features import ModelTables
from moe_env.agents.model_tables import build_tables
from moe_env.agents.prefetch_predictor import KIND, PredictorPrefetch, SetPredictorConfig
from moe_env.agents.run_state import load_latest
from moe_env.agents.set_predictor import (
    NUM_PREDICTOR_FEATURES,
    PredictionFeatures,
    PredictionSamples,
    collect_samples,
    decode_cells,
    samples_for,
)
from moe_env.agents.set_scorer import SetScorerNet

from moe_env.atomic import atomic_write
from moe_env.errors import CheckpointError
from moe_env.sim import model_spec
from moe_env.trace import Trace


@dataclass
class TrainingData:
    train: PredictionSamples
    validation: PredictionSamples
    tables: ModelTables  # of the whole training split (validation, calibration, evaluation, shipping)


def collect_training(train: Trace, validation: Trace, tables: ModelTables, config: SetPredictorConfig,
                     progress: Callable[[int], None] | None = None) -> TrainingData:  # fmt: skip
    rng = np.random.default_rng(config.seed)
    if config.max_sequences is not None and len(train.sequences) > config.max_sequences:
        chosen = np.sort(rng.choice(len(train.sequences), config.max_sequences, replace=False))
        train = Trace(train.meta, [train.sequences[int(i)] for i in chosen])  # tables stay those of all of it
    validation = Trace(validation.meta, validation.sequences[: config.validation_sequences])
    n = len(train.sequences)
    group = rng.random(n)  # < no_tables_share: online only; else fold by parity of a random order
    order = rng.permutation(n)
    fold = np.zeros(n, dtype=np.int64)
    fold[order] = np.arange(n) % 2
    hide = rng.random(n) < config.token_dropout
    online = group < config.no_tables_share
    spec = model_spec(train.meta)
    keep = min(1.0, config.max_samples / max(decode_cells(train), 1))
    parts = []
    folds = [np.nonzero(~online & (fold == f))[0] for f in (0, 1)]
    for f in (0, 1):
        own, other = folds[f], folds[1 - f]
        if not len(own):
            continue
        table = build_tables(_pick(train, other)) if len(other) else None
        parts.append(_collect(_pick(train, own), PredictionFeatures(spec, table), keep, hide[own],
                              config.seed + 1 + f, progress))  # fmt: skip
    alone = np.nonzero(online)[0]
    if len(alone):
        parts.append(_collect(_pick(train, alone), PredictionFeatures(spec, None), keep, hide[alone],
                              config.seed + 3, progress))  # fmt: skip
    held = samples_for(validation, tables, config.validation_samples, config.seed + 4)
    if progress is not None:
        for i in range(len(validation.sequences)):
            progress(i)
    return TrainingData(PredictionSamples.concat(parts), held, tables)


def _pick(trace: Trace, index: np.ndarray) -> Trace:
    return Trace(trace.meta, [trace.sequences[int(i)] for i in sorted(index)])


def _collect(trace: Trace, features: PredictionFeatures, keep: float, hide: np.ndarray, seed: int,
             progress) -> PredictionSamples:  # fmt: skip
    """`hide[i]`: hide the tokens of the i-th sequence of `trace`."""
    return collect_samples(trace, features, keep, seed, keep_tokens=lambda i: not bool(hide[i]),
                           progress=progress)  # fmt: skip


_ARRAYS = ("rows", "truth", "previous", "layer", "has_previous", "has_token")


def save_samples(samples: PredictionSamples, path: Path) -> Path:
    """Atomic: a crash mid-write leaves the previous file."""
    with atomic_write(path, mode=0o600) as handle:  # the run's own resume state, private as before
        np.savez(handle, **{name: getattr(samples, name) for name in _ARRAYS})
    return path


def load_samples(path: Path) -> PredictionSamples:
    try:
        with np.load(path, allow_pickle=False) as data:
            samples = PredictionSamples(*(data[name] for name in _ARRAYS))
    except Exception as exc:  # missing or damaged
        raise CheckpointError(f"{path}: cannot resume from these samples ({type(exc).__name__})") from None
    n = len(samples.layer)
    if (
        samples.rows.ndim != 3
        or samples.rows.shape[2] != NUM_PREDICTOR_FEATURES
        or any(len(getattr(samples, name)) != n for name in _ARRAYS)
    ):
        raise CheckpointError(f"{path}: inconsistent samples (other features or a torn file)")
    return samples


def load_epoch(run_dir: Path) -> tuple[int, SetScorerNet | None, list[dict]]:
    """(next epoch, the last epoch's network, the epochs' history) of a run directory."""
    return load_latest(run_dir, "epoch", KIND, width=NUM_PREDICTOR_FEATURES)


def cache_figures(trace: Trace, path: Path, tables: ModelTables | None, capacity: int,
                  profile: str | None) -> list[dict[str, Any]]:  # fmt: skip
    """LRU with no prefetch, with affinity prefetch and with this predictor: hit rate, stall, prefetch use."""
    from moe_env.policy import CombinedPolicy, make_policy
    from moe_env.sim import simulate

    rows = []
    for name in ("none", "affinity", "predictor"):
        if name == "none":
            policy = make_policy("lru")
        else:
            prefetcher = make_policy("affinity") if name == "affinity" else PredictorPrefetch(path, tables=tables)
            prefetcher.name = name
            policy = CombinedPolicy(make_policy("lru"), prefetcher)
        result = simulate(trace, policy, capacity, profile)
        rows.append({"policy": f"lru+{name}", "hit_rate": result.hit_rate,
                     "stall_s_per_token": result.stall_s_per_token, "prefetch_used": result.prefetch_used,
                     "prefetch_wasted": result.prefetch_wasted})  # fmt: skip
    return rows
