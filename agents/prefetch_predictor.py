"""The learned prefetch plug-in (``--prefetch predictor``): one checkpoint for any (layers, experts, top-k).

After layer l of token t routes, ``PredictorPrefetch`` scores every expert of layers l+1 .. l+h of the same
token (h: the horizon, from the checkpoint or ``horizon=``; ``auto``: the cost model's copy ratio, the number of
layers of compute one copy takes) with the set predictor of agents/set_predictor.py (per-expert features, shared
weights; layer l+1 reads layer l's routed experts, each farther layer the predicted probabilities of the one
before it: ``predict_ahead``) and prefetches, nearest layer first:
- per target layer, only experts among the predictor's top ``max_prefetch`` (default: the model's top-k) that are
  not resident;
- only where p >= the prefetch threshold, which is cost-aware: calibrated on validation at the calibration
  profile's copy ratio and moved to the ratio of the cost model in use (agents/predictor.py
  ``cost_aware_threshold``: a wrong prefetch delays the demand loads queued behind it on the FIFO link);
- only into a free slot, or while the layer still holds an evictable resident (not in flight) that the predictor
  finds LESS likely at this token: the i-th prefetch beyond the free slots needs a probability above the i-th
  least likely evictable resident's (the cache's eviction policy chooses the victim; this bounds how many
  evictions a prefetch may cause to the number of residents it ranks below the candidate);
- with ``max_in_flight=N``, only while fewer than N of its prefetches are queued on the link ahead of a new one
  beyond what the current layer waits for anyway: those issued since the latest demand load (the link is FIFO:
  every prefetch issued before a demand load lands before it, so once a layer has demand-loaded, the copies
  queued before are spent time; a copy queued behind other prefetches fills no idle link time and delays the
  demand loads behind it); the likeliest candidates of all target layers are kept. Only cache residency is
  read, so the engine can apply it too.
It never reads the future (``needs_future`` is False): at step t it sees routing up to (t, l) and token t.
Nothing is prefetched during prefill, and nothing for the next token: its identity, and so its token-table
signal, is unknown until it is sampled, and the features of step t+1 are not built here (see README).

A checkpoint lists under ``needs`` the signals its training rows never lacked (e.g. tokens, when every training
sequence had them); such a checkpoint is refused, with one line naming the signal, on a trace without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from moe_env.agents.checkpoint import PolicyCheckpoint, load_checkpoint, load_weights, save_checkpoint
from moe_env.agents.model_tables import find_shipped_tables, load_tables
from moe_env.agents.predictor import copy_ratio, cost_aware_threshold
from moe_env.agents.set_predictor import (
    NUM_PREDICTOR_FEATURES,
    PREDICTOR_FEATURES,
    PredictionFeatures,
    PredictionSamples,
    predict_ahead,
    sigmoid,
)
from moe_env.agents.set_scorer import NumpyScorer, SetScorerNet

from moe_env.errors import CheckpointError, UsageError
from moe_env.policy import CacheView, ModelSpec, Policy, RouteEvent

KIND = "set-predictor"
THRESHOLDS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95)
HORIZONS = (1, 2, 3, 4)  # layers ahead the calibration tries
IN_FLIGHT = (None, 1)  # in-flight budgets it tries (None: no budget)


def shipped_predictor_path() -> Path:
    import moe_env

    return Path(moe_env.__file__).resolve().parent / "assets" / "policies" / "predictor.pt"


@dataclass
class SetPredictorConfig:
    """train/configs/predictor.json holds these fields; None means derived from the trace."""

    hidden: int = 32
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 128  # samples per batch (each holds one row per expert)
    max_samples: int = 40_000  # training (t, m) cells, drawn at random from the training split
    max_sequences: int | None = 300  # training sequences replayed (drawn at random); None: all
    validation_samples: int = 8_000
    validation_sequences: int = 50  # validation sequences replayed (the first ones)
    token_dropout: float = 0.25  # share of training sequences replayed with their tokens hidden
    no_tables_share: float = 0.25  # share replayed with online statistics only (no model tables)
    threshold: float = 0.5  # prefetch threshold before calibration
    max_prefetch: int | None = None  # None: the model's top-k
    calibrate_sequences: int = 20  # validation sequences the threshold is calibrated on
    calibrate_capacity: int | None = None  # None: a quarter of the experts (at least top-k + 1)
    seed: int = 0

    def check(self) -> None:
        for name in (
            "hidden",
            "epochs",
            "batch_size",
            "max_samples",
            "validation_samples",
            "validation_sequences",
            "calibrate_sequences",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"predictor config: {name} must be a positive integer, not {value!r}")
        for name in ("token_dropout", "no_tables_share"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise UsageError(f"predictor config: {name} must be in [0, 1), not {value!r}")
        if self.max_sequences is not None and (not isinstance(self.max_sequences, int) or self.max_sequences < 1):
            raise UsageError(
                f"predictor config: max_sequences must be a positive integer or null, not {self.max_sequences!r}"
            )
        if not isinstance(self.lr, int | float) or not 0 < self.lr < 1:
            raise UsageError(f"predictor config: lr must be in (0, 1), not {self.lr!r}")
        if not isinstance(self.threshold, int | float) or not 0 < self.threshold <= 1.01:
            raise UsageError(f"predictor config: threshold must be in (0, 1.01], not {self.threshold!r}")


def default_calibration_capacity(num_experts: int, top_k: int) -> int:
    return max(top_k + 1, min(num_experts - 1, round(num_experts / 4)))


# signal -> (its "missing" column, is it present on a decode event)
SIGNALS: dict[str, tuple[str, Any]] = {
    "tokens": ("token_missing", lambda event: bool(event.extra) and event.extra.get("token") is not None),
    "gate logits": ("gate_missing", lambda event: event.gate_logits is not None),
    "gate weights": ("weight_missing", lambda event: event.weights is not None),
}


def needed_signals(samples: PredictionSamples) -> list[str]:
    """Signals whose "missing" column never fired in training: the predictor never learned to do without them."""
    if not len(samples.layer):
        return []
    return [name for name, (column, _) in SIGNALS.items()
            if samples.rows[:, :, PREDICTOR_FEATURES.index(column)].max() == 0]  # fmt: skip


def save_set_predictor(net: SetScorerNet, config: SetPredictorConfig, path: str | os.PathLike,
                       extra: dict[str, Any] | None = None) -> Path:  # fmt: skip
    described = asdict(config) | {"features": list(PREDICTOR_FEATURES)} | (extra or {})
    model = {"name": "", "num_layers": 0, "num_experts": 0, "top_k": 0}  # shape-agnostic
    return save_checkpoint(PolicyCheckpoint(KIND, model, 0, NUM_PREDICTOR_FEATURES, described, net.state_dict()),
                           path)  # fmt: skip


def load_set_predictor(path: str | os.PathLike) -> tuple[SetScorerNet, dict[str, Any]]:
    ckpt = load_checkpoint(path, KIND)
    saved = list(ckpt.config.get("features", []))
    if saved != list(PREDICTOR_FEATURES):
        raise CheckpointError(f"{path}: trained on features {saved}, this moe-env computes {list(PREDICTOR_FEATURES)}")
    try:
        net = SetScorerNet(NUM_PREDICTOR_FEATURES, int(ckpt.config.get("hidden", 32)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad predictor config ({exc})") from None
    load_weights(net, ckpt, path)
    return net.eval(), ckpt.config


def choose_prefetches(p: np.ndarray, resident: np.ndarray, evictable: np.ndarray, free: int, threshold: float,
                      limit: int) -> list[int]:  # fmt: skip
    """Experts to prefetch, best first (see the module docstring): p [E] probabilities, resident [E] bool,
    evictable: ids of residents the cache may evict, free: empty slots of the layer."""
    order = np.argsort(-p, kind="stable")[:limit]
    wanted = [int(e) for e in order if not resident[e] and p[e] >= threshold]
    if len(wanted) <= free:
        return wanted
    below = np.sort(p[evictable]) if len(evictable) else np.zeros(0)
    chosen: list[int] = []
    for i, expert in enumerate(wanted):
        j = i - free
        if j >= 0 and (j >= len(below) or p[expert] <= below[j]):
            break
        chosen.append(expert)
    return chosen


class PredictorPrefetch(Policy):
    """``--prefetch predictor[:PATH][,threshold=T][,horizon=H|auto][,max_in_flight=N][,copy_ratio=R]
    [,cost_aware=False][,tables=PATH|none][,max_prefetch=N]``; no PATH: the shipped one (trained on
    DeepSeek-V2-Lite routing, runs on any shape).

    Model tables warm-start the online statistics: the shipped ones of the model's shape unless ``tables`` is
    given (``none``: start empty). Without ``threshold`` / ``horizon`` / ``max_in_flight`` the checkpoint's
    (calibrated) ones; the threshold is moved to the bound cost model's copy ratio (or to ``copy_ratio``: the
    engine has no cost model), ``cost_aware=False``: as calibrated. ``horizon=auto``: ceil(copy ratio) layers
    (1 without a cost model or ``copy_ratio``); a horizon beyond the last layer stops at the last layer."""

    prefetch_only = True

    def __init__(self, path: str | os.PathLike | None = None, threshold: float | None = None,
                 copy_ratio: float | None = None, cost_aware: bool = True, tables: Any = None,
                 max_prefetch: int | None = None, horizon: int | str | None = None,
                 max_in_flight: int | str | None = None):  # fmt: skip
        self.path = Path(path) if path else shipped_predictor_path()
        net, config = load_set_predictor(self.path)
        self.scorer = NumpyScorer(net)
        try:
            self.base_threshold = float(config.get("threshold", 0.5) if threshold is None else threshold)
            self.calibrated_ratio = float(config.get("copy_ratio", 1.0))
            self.copy_ratio = None if copy_ratio is None else float(copy_ratio)
            limit = config.get("max_prefetch") if max_prefetch is None else max_prefetch
            self.max_prefetch = None if limit is None else int(limit)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: bad predictor setting ({exc})") from None
        if self.max_prefetch is not None and self.max_prefetch < 1:
            raise UsageError(f"predictor: max_prefetch must be >= 1, not {self.max_prefetch}")
        self.horizon_setting = parse_horizon(config.get("horizon", 1) if horizon is None else horizon)
        flying = config.get("max_in_flight") if max_in_flight is None else max_in_flight
        self.max_in_flight = parse_max_in_flight(flying)
        self.horizon = 1  # set by reset from the setting and the model
        self.threshold = self.base_threshold
        self.adapt = threshold is None and bool(cost_aware)
        self.needs = [str(n) for n in config.get("needs", [])]
        unknown = sorted(set(self.needs) - set(SIGNALS))
        if unknown:
            raise CheckpointError(f"{self.path}: needs unknown signals {unknown} (known: {', '.join(SIGNALS)})")
        self.tables = "shipped" if tables is None else tables
        self.features: PredictionFeatures | None = None
        self._cost = None
        self._checked = False
        self._queued = 0  # prefetches issued since the latest demand load (see the module docstring)

    def _tables(self, spec: ModelSpec):
        if isinstance(self.tables, str):
            if self.tables.lower() == "none":
                return None
            return find_shipped_tables(spec) if self.tables == "shipped" else load_tables(self.tables, spec)
        return self.tables

    def bind_cost_model(self, cost) -> None:
        self._cost = cost

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        """The cache is empty; the online statistics of the deployment survive unless the model changed."""
        super().reset(spec, capacity)
        if self.features is None or self.features.spec != spec:
            self.features = PredictionFeatures(spec, self._tables(spec))
        ratio = self.copy_ratio
        if ratio is None and self._cost is not None:
            ratio = copy_ratio(self._cost, spec.top_k)
        if self.adapt:
            self.threshold = cost_aware_threshold(self.base_threshold, ratio, self.calibrated_ratio)
        if self.horizon_setting == "auto":
            horizon = max(1, math.ceil(ratio - 1e-9)) if ratio is not None else 1
        else:
            horizon = int(self.horizon_setting)
        self.horizon = max(1, min(horizon, spec.num_layers - 1))

    def begin_sequence(self, cache: CacheView) -> None:
        self.features.begin_sequence()
        self._checked = not self.needs
        self._queued = 0

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        if not self._checked and not event.prefill:
            for name in self.needs:
                if not SIGNALS[name][1](event):
                    raise CheckpointError(
                        f"{self.path}: this predictor needs the {name} (trained only where they exist), which this "
                        "trace lacks; train it with token_dropout > 0 / on traces without them, or use another one"
                    )
            self._checked = True
        if not all(cache.is_resident(event.layer, e) for e in event.experts):
            self._queued = 0  # a demand load queues behind every earlier prefetch: they land before it
        self.features.update(event)

    def probabilities(self, layer: int) -> np.ndarray:
        """P(routed at the current step) of every expert of `layer` (its previous layer has routed this step)."""
        return sigmoid(self.scorer(self.features.rows(layer)))

    def prefetch(self, event: RouteEvent, cache: CacheView) -> Sequence[tuple[int, int]]:
        if event.prefill or event.layer + 1 >= self.spec.num_layers or not 0.0 < self.threshold <= 1.0:
            return ()
        budget: int | None = None
        if self.max_in_flight is not None:
            budget = self.max_in_flight - self._queued
            if budget <= 0:
                return ()
        candidates: list[tuple[float, int, int]] = []  # (p, target layer, expert)
        for m, p in predict_ahead(self.features, self.scorer, event.layer, self.horizon):
            residents = cache.resident(m)
            resident = np.zeros(len(p), dtype=bool)
            resident[residents] = True
            flying_m = set(cache.in_flight(m))
            evictable = np.asarray([e for e in residents if e not in flying_m], dtype=np.int64)
            free = max(cache.layer_capacity(m) - len(residents), 0)
            limit = min(self.max_prefetch or self.spec.top_k, cache.layer_capacity(m))
            chosen = choose_prefetches(p, resident, evictable, free, self.threshold, limit)
            candidates.extend((float(p[e]), m, e) for e in chosen)
        if budget is not None and len(candidates) > budget:
            kept = sorted(range(len(candidates)), key=lambda i: -candidates[i][0])[:budget]
            candidates = [candidates[i] for i in sorted(kept)]  # nearest layer first, as collected
        self._queued += len(candidates)  # each is new (not resident), and the cache issues it unless it is full
        return [(m, e) for _, m, e in candidates]


def parse_horizon(value: Any) -> int | str:
    """A horizon setting: a positive number of layers, or "auto" (from the cost model's copy ratio)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        horizon = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"predictor: horizon must be a positive integer or auto, not {value!r}") from None
    if horizon < 1 or isinstance(value, bool) or (isinstance(value, float) and value != horizon):
        raise UsageError(f"predictor: horizon must be a positive integer or auto, not {value!r}")
    return horizon


def parse_max_in_flight(value: Any) -> int | None:
    """None / "none": no limit; else a positive number of prefetches in flight for the layers ahead."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"predictor: max_in_flight must be a positive integer or none, not {value!r}") from None
    if limit < 1 or isinstance(value, bool):
        raise UsageError(f"predictor: max_in_flight must be a positive integer or none, not {value!r}")
    return limit


def calibrate(path: Path, validation, capacity: int, profile: str | None, tables: Any = None, log=print,
              horizons: Sequence[int] = HORIZONS, in_flight: Sequence[int | None] = IN_FLIGHT,
              thresholds: Sequence[float] = THRESHOLDS) -> tuple[float, float]:  # fmt: skip
    """The prefetch setting with the lowest stall per token on `validation` (LRU eviction), in two stages: the
    threshold (of `thresholds`) one layer ahead with no in-flight budget (ties: the higher threshold, fewer
    copies), then at that threshold every horizon x in-flight budget (kept only if strictly lower: the simpler
    setting wins ties). Written back into the checkpoint with the profile's copy ratio, every setting's stall and
    the stall of no prefetch at all (the log says when none beats it); returns (threshold, stall s/token)."""
    from moe_env.policy import CombinedPolicy, make_policy
    from moe_env.sim import cost_model_for, simulate

    table: dict[str, float] = {}

    def stall_of(threshold: float, horizon: int, flying: int | None) -> float:
        prefetcher = PredictorPrefetch(path, threshold=threshold, tables=tables, horizon=horizon,
                                       max_in_flight="none" if flying is None else flying)  # fmt: skip
        prefetcher.name = f"predictor:threshold={threshold},horizon={horizon},max_in_flight={flying}"
        result = simulate(validation, CombinedPolicy(make_policy("lru"), prefetcher), capacity, profile)
        stall = result.stall_s_per_token
        table[f"threshold={threshold},horizon={horizon},max_in_flight={flying}"] = 1e3 * stall
        log(f"calibration: threshold {threshold}, horizon {horizon}, max_in_flight {flying}: {1e3 * stall:.3f} "
            f"ms/token, hit rate {result.hit_rate:.3f}, prefetches used {result.prefetch_used} wasted "
            f"{result.prefetch_wasted}")  # fmt: skip
        return stall

    best: tuple[float, int, int | None, float] | None = None  # (threshold, horizon, in flight, stall)
    for threshold in thresholds:
        stall = stall_of(threshold, 1, None)
        if best is None or stall <= best[3] + 1e-12:
            best = (threshold, 1, None, stall)
    assert best is not None
    for horizon in horizons:
        for flying in in_flight:
            if (horizon, flying) == (1, None):
                continue
            stall = stall_of(best[0], horizon, flying)
            if stall < best[3] - 1e-12:
                best = (best[0], horizon, flying, stall)
    threshold, horizon, flying, stall = best
    demand = simulate(validation, "lru", capacity, profile).stall_s_per_token
    ratio = copy_ratio(cost_model_for(validation.meta, profile), validation.meta.top_k)
    ckpt = load_checkpoint(path, KIND)
    ckpt.config.update(threshold=threshold, horizon=horizon, max_in_flight=flying, copy_ratio=ratio,
                       calibrated_capacity=capacity, calibrated_profile=profile, calibrated_stall_s_per_token=stall,
                       no_prefetch_stall_s_per_token=demand, calibration_ms_per_token=table)  # fmt: skip
    save_checkpoint(ckpt, path)
    verdict = "below" if stall < demand else "NOT below"
    log(f"calibrated threshold {threshold}, horizon {horizon}, max_in_flight {flying} ({1e3 * stall:.3f} ms/token "
        f"at {capacity} slots, copy ratio {ratio:.2f}; {verdict} LRU without prefetch, {1e3 * demand:.3f} ms/token)")
    return threshold, stall
