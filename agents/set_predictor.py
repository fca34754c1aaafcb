"""Shape-agnostic prediction of the next layer's experts: per-candidate features, samples, training, quality.

When layer l has routed token t, the experts of layer m = l + 1 for the same token are unknown; a prefetcher
must guess them. ``PredictionFeatures`` gives every expert of layer m its own feature row: the columns of
agents/candidate_features.py that describe routing (not the cache: resident age and budget are left out, so a
prediction never depends on the eviction policy) plus columns of this module (``EXTRA_FEATURES``): the density
k / E, whether layer m used the expert at token t-1, and for the strongest signals the expert's rank among the
layer's experts (a pointwise scorer cannot compare candidates by itself). One small MLP with weights shared
across experts, layers and models (agents/set_scorer.py ``SetScorerNet``) maps a row to the logit of "routed at
(t, m)", trained pointwise with binary cross-entropy; one checkpoint runs on any (layers, experts, top-k).

Causality: features are computed after ``update(event)`` of layer l at step t, from routing of steps <= t up to
layer l and token t (the input of step t); the label (the experts of (t, m)) is never read by the features.

``prediction_quality`` reports precision and recall at k per target layer for the predictor and for three
baselines on the same rows: the same experts as the previous token, the inter-layer signal alone
(co-activation with layer l's experts, learned online and warm-started from model tables) and the token table
alone (the layer's long-run popularity where the table does not know the token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from moe_env.agents.candidate_features import EVICTION_COLUMNS, FEATURES, SMOOTHING, CandidateFeatures, ModelTables
from moe_env.agents.set_scorer import IGNORED_STD, NumpyScorer, SetScorerNet

from moe_env.policy import ModelSpec, RouteEvent
from moe_env.routing import route_events
from moe_env.sim import model_spec
from moe_env.trace import SequenceTrace, Trace

# cache-dependent columns of candidate_features (the eviction policy's state): a routing prediction ignores them
CACHE_COLUMNS = ("resident_age", "budget", "top_k_per_slot")
# the eviction scorer's later columns are not the predictor's (its checkpoints fix their width)
BASE_COLUMNS = tuple(name for name in FEATURES if name not in CACHE_COLUMNS and name not in EVICTION_COLUMNS)
RANKED = ("transition", "coactivation", "token", "token_next", "lookahead_prob", "gate_prob", "decay_fast",
          "long_share")  # fmt: skip
EXTRA_FEATURES = ("density", "last_token", *(f"rank_{name}" for name in RANKED))
PREDICTOR_FEATURES = BASE_COLUMNS + EXTRA_FEATURES
NUM_PREDICTOR_FEATURES = len(PREDICTOR_FEATURES)
RANK_CAP = 3.0  # ranks are in units of top-k, capped: beyond 3k an expert's rank says little
_BASE_INDEX = np.asarray([FEATURES.index(name) for name in BASE_COLUMNS])
_RANK_INDEX = np.asarray([FEATURES.index(name) for name in RANKED])
_COACTIVATION, _FIRST_LAYER = FEATURES.index("coactivation"), FEATURES.index("first_layer")


class _NoCache:
    """The cache view candidate_features needs, with no cache: routing features never read cache state."""

    def __init__(self, spec: ModelSpec):
        self._loaded = np.zeros(spec.num_experts, dtype=np.int64)
        self._loaded.flags.writeable = False

    def loaded_at(self, layer: int) -> np.ndarray:
        return self._loaded


class PredictionFeatures:
    """Online routing state of one deployment; ``rows(layer)`` are the predictor's inputs [E, F] for `layer`."""

    def __init__(self, spec: ModelSpec, tables: ModelTables | None = None):
        self.spec = spec
        self.base = CandidateFeatures(spec, max(spec.top_k, 1), tables, BASE_COLUMNS)
        self._no_cache = _NoCache(spec)
        self._density = spec.top_k / spec.num_experts

    def begin_sequence(self) -> None:
        self.base.begin_sequence()

    def update(self, event: RouteEvent) -> None:
        self.base.update(event, 0)

    def rows(self, layer: int, given: np.ndarray | None = None) -> np.ndarray:
        """Features [E, NUM_PREDICTOR_FEATURES] of every expert of `layer` at the current step. `given` [E]: a
        distribution over layer-1's experts at this step when layer-1 has not routed yet (multi-layer-ahead
        prediction: the predicted probabilities of layer-1); its inter-layer signal is the chained, soft
        co-activation (``soft_coactivation``) instead of the hard one of layer-1's routed experts."""
        base = self.base
        full = base.layer_rows(layer, self._no_cache)
        if given is not None:
            full = full.copy()
            full[:, _COACTIVATION] = soft_coactivation(base, layer, given)
            full[:, _FIRST_LAYER] = 0.0
        e, k = self.spec.num_experts, self.spec.top_k
        out = np.empty((e, NUM_PREDICTOR_FEATURES))
        nb = len(BASE_COLUMNS)
        out[:, :nb] = full[:, _BASE_INDEX]
        out[:, nb] = self._density
        last = np.zeros(e)
        if base.current_step[layer] == base.step - 1 and base.current[layer]:
            last[list(base.current[layer])] = 1.0
        out[:, nb + 1] = last
        signals = full[:, _RANK_INDEX]  # [E, R]
        order = np.argsort(-signals, axis=0, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(e)[:, None], axis=0)
        flat = signals.max(axis=0) == signals.min(axis=0)  # no signal (e.g. token unknown): every rank equal
        scaled = np.minimum(ranks / k, RANK_CAP)
        scaled[:, flat] = RANK_CAP
        out[:, nb + 2 :] = scaled
        return out

    def routed_now(self, layer: int) -> tuple[int, ...]:
        """The experts `layer` routed at the current step (empty if it has not routed yet)."""
        base = self.base
        return base.current[layer] if base.current_step[layer] == base.step else ()


def soft_coactivation(base: CandidateFeatures, layer: int, given: np.ndarray) -> np.ndarray:
    """candidate_features' co-activation column of `layer` with the hard set of layer-1's experts replaced by a
    distribution `given` over them: log of sum_j w_j P(e at layer | j at layer-1) / uniform, w = given / sum,
    each P smoothed toward the layer's long-run share exactly as candidate_features does. For a `given` that is
    uniform over k routed experts this is the hard column itself."""
    spec = base.spec
    weights = np.clip(np.asarray(given, dtype=np.float64), 0.0, None)
    total = weights.sum()
    if layer < 1 or total <= 0:
        return np.zeros(spec.num_experts)
    popularity = base.popularity[layer]
    prior = (popularity + 1.0) / (popularity.sum() + spec.num_experts) * spec.top_k
    table = base.coactivation[layer]  # [E, E]: (j at layer-1, e at layer)
    totals = table.sum(axis=1, keepdims=True) / spec.top_k
    p = (table + SMOOTHING * prior[None, :]) / (totals + SMOOTHING)
    uniform = spec.top_k / spec.num_experts
    return np.log((weights / total) @ p / uniform)


def predict_ahead(features: PredictionFeatures, scorer: NumpyScorer, layer: int,
                  horizon: int) -> list[tuple[int, np.ndarray]]:  # fmt: skip
    """P(routed at the current step) of every expert of layers layer+1 .. layer+horizon (clipped to the model's
    last layer), after `layer` has routed: (target layer, probabilities [E]) nearest first. Layer layer+1 reads
    layer's routed experts; each farther layer reads the predicted probabilities of the one before it (the
    inter-layer signal chains). Causal: only routing up to (t, layer) and token t are read."""
    out: list[tuple[int, np.ndarray]] = []
    last = min(layer + horizon, features.spec.num_layers - 1)
    given: np.ndarray | None = None
    for m in range(layer + 1, last + 1):
        p = sigmoid(scorer(features.rows(m, given)))
        out.append((m, p))
        given = p
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50.0, 50.0)))


def decode_events(sequence: SequenceTrace, vocab: list | None, keep_tokens: bool = True) -> Iterator[RouteEvent]:
    """The decode RouteEvents of a sequence as the simulator hands them to policies (token ids of an import
    become their text); prefill events too (they update the statistics). `keep_tokens=False` hides the tokens."""
    capacity = max(1, sequence.experts.shape[2])
    for routing in sequence.routings():
        if not keep_tokens:
            routing = replace(routing, token=None)
        elif vocab is not None and isinstance(routing.token, int) and 0 <= routing.token < len(vocab):
            routing = replace(routing, token=vocab[routing.token])
        yield from route_events(routing, capacity)


@dataclass
class PredictionSamples:
    rows: np.ndarray  # [N, E, F] float32: features of the target layer's experts, before it routes
    truth: np.ndarray  # [N, E] bool: routed at (t, m)
    previous: np.ndarray  # [N, E] bool: routed at (t - 1, m) (all False at t = 0)
    layer: np.ndarray  # [N] int: target layer m
    has_previous: np.ndarray  # [N] bool: t >= 1 and (t - 1, m) present
    has_token: np.ndarray  # [N] bool: the token table knows token t at layer m

    @staticmethod
    def concat(parts: list[PredictionSamples]) -> PredictionSamples:
        parts = [p for p in parts if len(p.layer)]
        if not parts:
            raise ValueError("no prediction samples")
        return PredictionSamples(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    def subset(self, index: np.ndarray) -> PredictionSamples:
        return PredictionSamples(*(getattr(self, f)[index] for f in _FIELDS))


_FIELDS = ("rows", "truth", "previous", "layer", "has_previous", "has_token")


def vocab_of(trace: Trace) -> list | None:
    vocab = trace.meta.extra.get("vocab") if isinstance(trace.meta.extra, dict) else None
    return vocab if isinstance(vocab, list) else None


def collect_samples(trace: Trace, features: PredictionFeatures, keep: float = 1.0, seed: int = 0,
                    keep_tokens: Callable[[int], bool] | None = None,
                    progress: Callable[[int], None] | None = None) -> PredictionSamples:  # fmt: skip
    """Every decode (t, m >= 1) of `trace` (a share `keep` of them, drawn at random), features from `features`
    (its online statistics keep learning across the sequences, as a server's would)."""
    spec = features.spec
    rng = np.random.default_rng(seed)
    e = spec.num_experts
    vocab = vocab_of(trace)
    token_col = PREDICTOR_FEATURES.index("token_missing")
    rows, truth, previous, layers, has_previous, has_token = [], [], [], [], [], []
    for i, sequence in enumerate(trace.sequences):
        features.begin_sequence()
        experts = sequence.experts
        tokens = keep_tokens(i) if keep_tokens is not None else True
        for event in decode_events(sequence, vocab, tokens):
            features.update(event)
            t, m = event.step, event.layer + 1
            if event.prefill or m >= spec.num_layers or experts[t, m, 0] < 0:
                continue
            if keep < 1.0 and rng.random() >= keep:
                continue
            row = features.rows(m)
            rows.append(row.astype(np.float32))
            hot = np.zeros(e, dtype=bool)
            hot[experts[t, m]] = True
            truth.append(hot)
            before = np.zeros(e, dtype=bool)
            present = t >= 1 and experts[t - 1, m, 0] >= 0
            if present:
                before[experts[t - 1, m]] = True
            previous.append(before)
            has_previous.append(present)
            has_token.append(row[0, token_col] == 0)
            layers.append(m)
        if progress is not None:
            progress(i)
    if not rows:
        empty = np.zeros((0, e), dtype=bool)
        return PredictionSamples(np.zeros((0, e, NUM_PREDICTOR_FEATURES), np.float32), empty, empty,
                                 np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))  # fmt: skip
    return PredictionSamples(np.asarray(rows), np.asarray(truth), np.asarray(previous), np.asarray(layers),
                             np.asarray(has_previous), np.asarray(has_token))  # fmt: skip


def decode_cells(trace: Trace) -> int:
    """How many (t, m >= 1) prediction cells `trace` holds (to subsample to a budget)."""
    return int(sum((s.experts[:, 1:, 0] >= 0).sum() for s in trace.sequences))


# --------------------------------------------------------------------------------------------------- training


def new_net(samples: PredictionSamples, hidden: int) -> SetScorerNet:
    """A scorer whose feature standardisation is fixed from `samples`. A column constant in training (a signal
    the training traces never had, e.g. gate logits in a log without them) gets zero input weights, which
    training never moves (its standardised input is always 0): where the signal exists it is ignored rather than
    fed, magnified by a tiny std, into weights that never learned it."""
    flat = samples.rows.reshape(-1, samples.rows.shape[2])
    net = SetScorerNet(flat.shape[1], hidden)
    std = flat.astype(np.float64).std(axis=0)
    constant = std < 1e-6
    with torch.no_grad():
        net.mean.copy_(torch.from_numpy(flat.mean(axis=0)).float())
        net.std.copy_(torch.from_numpy(np.where(constant, IGNORED_STD, np.maximum(std, 1e-3))).float())
        net.body[0].weight[:, torch.from_numpy(constant)] = 0.0
    return net


def train_epoch(net: SetScorerNet, opt: torch.optim.Optimizer, samples: PredictionSamples, batch: int,
                rng: np.random.Generator) -> float:  # fmt: skip
    """One pass of pointwise BCE over the samples' rows (batches of `batch` samples); the mean loss."""
    n, _, f = samples.rows.shape
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = rng.permutation(n)
    total = 0.0
    net.train()
    for start in range(0, n, batch):
        index = order[start : start + batch]
        x = torch.from_numpy(samples.rows[index].reshape(-1, f))
        y = torch.from_numpy(samples.truth[index].reshape(-1).astype(np.float32))
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(index)
    net.eval()
    return total / max(n, 1)


def bce(net: SetScorerNet, samples: PredictionSamples) -> float:
    with torch.no_grad():
        f = samples.rows.shape[2]
        logits = net(torch.from_numpy(samples.rows.reshape(-1, f)))
        y = torch.from_numpy(samples.truth.reshape(-1).astype(np.float32))
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y))


# ---------------------------------------------------------------------------------------------------- quality


def _at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """(precision, recall) of the top-k of each row (ties: lowest expert id)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(truth, top, axis=1).sum()
    return float(hits / (k * len(truth))), float(hits / max(truth.sum(), 1))


def method_scores(samples: PredictionSamples, scorer: NumpyScorer | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Method -> (scores [N, E], rows it can score [N]). The token table falls back to the layer's long-run
    popularity where it does not know the token (what a table alone would do)."""
    n, e, f = samples.rows.shape
    col = PREDICTOR_FEATURES.index
    everywhere = np.ones(n, dtype=bool)
    known = samples.has_token[:, None]
    token = np.where(known, samples.rows[:, :, col("token")], samples.rows[:, :, col("long_share")])
    out = {
        "previous_token": (samples.previous.astype(np.float64), samples.has_previous),
        "inter_layer": (samples.rows[:, :, col("coactivation")].astype(np.float64), everywhere),
        "token_table": (token.astype(np.float64), everywhere),
    }
    if scorer is not None:
        out["predictor"] = (scorer(samples.rows.reshape(-1, f).astype(np.float64)).reshape(n, e), everywhere)
    return out


def prediction_quality(samples: PredictionSamples, scorer: NumpyScorer | None, top_k: int) -> dict[str, dict]:
    """Per method: precision/recall at k over all rows and per target layer, every method on the same rows (those
    with a previous token, so that "same as the previous token" is defined)."""
    methods = method_scores(samples, scorer)
    rows = np.logical_and.reduce([valid for _, valid in methods.values()])
    out: dict[str, dict] = {}
    for name, (scores, _) in methods.items():
        if not rows.any():
            out[name] = {"precision": float("nan"), "recall": float("nan"), "samples": 0, "per_layer": {}}
            continue
        precision, recall = _at_k(scores[rows], samples.truth[rows], top_k)
        per_layer = {}
        for m in np.unique(samples.layer[rows]):
            here = rows & (samples.layer == m)
            per_layer[int(m)] = _at_k(scores[here], samples.truth[here], top_k)
        out[name] = {"precision": precision, "recall": recall, "samples": int(rows.sum()), "per_layer": per_layer,
                     "token_known": float(samples.has_token[rows].mean())}  # fmt: skip
    return out


def samples_for(trace: Trace, tables: ModelTables | None, max_samples: int | None = None,
                seed: int = 0) -> PredictionSamples:  # fmt: skip
    """Samples of a whole trace with fresh online statistics warm-started from `tables` (evaluation)."""
    cells = decode_cells(trace)
    keep = 1.0 if not max_samples or cells <= max_samples else max_samples / cells
    return collect_samples(trace, PredictionFeatures(model_spec(trace.meta), tables), keep, seed)


# ------------------------------------------------------------------------------------------ quality, h ahead

AHEAD_METHODS = ("predictor", "previous_token", "inter_layer_chained", "token_table")


def ahead_quality(trace: Trace, tables: ModelTables | None, scorer: NumpyScorer, horizon: int, keep: float = 1.0,
                  seed: int = 0) -> dict[int, dict[str, float]]:  # fmt: skip
    """Precision at k (= recall at k) of predicting layer l+d's experts right after layer l of the same token has
    routed, for d = 1..horizon, as the prefetch plug-in predicts them (``predict_ahead``), against three signals
    on the same rows (t >= 1): the same experts as the previous token at layer l+d, the inter-layer signal
    chained from layer l's experts through the co-activation tables alone, and the token table (the layer's
    long-run popularity where the table does not know the token). A share `keep` of the (t, l) is drawn."""
    spec = model_spec(trace.meta)
    features = PredictionFeatures(spec, tables)
    rng = np.random.default_rng(seed)
    k = spec.top_k
    col = PREDICTOR_FEATURES.index
    hits = {d: dict.fromkeys(AHEAD_METHODS, 0) for d in range(1, horizon + 1)}
    cells = dict.fromkeys(range(1, horizon + 1), 0)
    vocab = vocab_of(trace)
    uniform = k / spec.num_experts
    for sequence in trace.sequences:
        features.begin_sequence()
        experts = sequence.experts
        for event in decode_events(sequence, vocab):
            features.update(event)
            t, layer = event.step, event.layer
            if event.prefill or t < 1 or layer + 1 >= spec.num_layers or (keep < 1.0 and rng.random() >= keep):
                continue
            predicted = predict_ahead(features, scorer, layer, horizon)
            chained = np.zeros(spec.num_experts)
            chained[list(event.experts)] = 1.0
            for d, (m, p) in enumerate(predicted, 1):
                truth = experts[t, m]
                before = experts[t - 1, m]
                if truth[0] < 0 or before[0] < 0:
                    continue
                chained = uniform * np.exp(soft_coactivation(features.base, m, chained))
                rows = features.rows(m)  # its token columns (the chained signal does not touch them)
                token = rows[:, col("token")] if rows[0, col("token_missing")] == 0 else rows[:, col("long_share")]
                previous = np.zeros(spec.num_experts)
                previous[before] = 1.0
                for name, scores in (("predictor", p), ("previous_token", previous),
                                     ("inter_layer_chained", chained), ("token_table", token)):  # fmt: skip
                    top = np.argsort(-scores, kind="stable")[:k]
                    hits[d][name] += int(np.isin(top, truth).sum())
                cells[d] += 1
    return {d: {name: hits[d][name] / max(k * cells[d], 1) for name in AHEAD_METHODS} | {"cells": cells[d]}
            for d in hits}  # fmt: skip
