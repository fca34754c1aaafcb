"""Shape-agnostic prediction of the next layer's experts, and how it compares with the simple signals.

When layer l has routed token t, the experts of layer m = l + 1 for the same token are unknown; a prefetcher
must guess them. The set predictor scores each expert of layer m from its own feature row
(agents/candidate_features.py: same-layer transitions from token t-1, the inter-layer co-activation with layer
l's experts at token t, the token table of token t, recency, counts...) with a SetScorerNet trained pointwise
(binary cross-entropy: is the expert routed at (t, m)?). ``prediction_quality`` reports precision and recall at k
per layer for the predictor and for three baselines: the same experts as the previous token, the inter-layer
signal alone and the token table alone (their columns of the same rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from moe_env.agents.candidate_features import FEATURES, CandidateFeatures, ModelTables
from moe_env.agents.set_scorer import NumpyScorer, SetScorerNet

from moe_env.cache import ExpertCacheState
from moe_env.policy import make_policy
from moe_env.routing import route_events
from moe_env.sim import model_spec
from moe_env.trace import Trace


@dataclass
class PredictionSamples:
    rows: np.ndarray  # [N, E, F] features of the target layer's experts, before it routes
    truth: np.ndarray  # [N, E] bool: routed at (t, m)
    previous: np.ndarray  # [N, E] bool: routed at (t - 1, m)
    layer: np.ndarray  # [N] target layer m


def prediction_samples(trace: Trace, tables: ModelTables | None, capacity: int) -> PredictionSamples:
    """Every decode (t, m) with m >= 1 and a previous token, features as the cache's policies would see them."""
    spec = model_spec(trace.meta)
    features = CandidateFeatures(spec, capacity, tables)
    rows, truth, previous, layers = [], [], [], []
    e = spec.num_experts
    for sequence in trace.sequences:
        cache = ExpertCacheState(spec, capacity, make_policy("lru"))  # resident ages as under LRU
        cache.begin_sequence()
        features.begin_sequence()
        experts = sequence.experts
        for routing in sequence.routings():
            for event in route_events(routing, cache):
                t, m = event.step, event.layer + 1
                features.update(event, cache.clock)
                cache.route(event)
                if event.prefill or m >= spec.num_layers or t < 1 or experts[t, m, 0] < 0 or experts[t - 1, m, 0] < 0:
                    continue
                rows.append(features.layer_rows(m, cache).astype(np.float32))
                row = np.zeros(e, dtype=bool)
                row[experts[t, m]] = True
                truth.append(row)
                before = np.zeros(e, dtype=bool)
                before[experts[t - 1, m]] = True
                previous.append(before)
                layers.append(m)
    return PredictionSamples(np.asarray(rows), np.asarray(truth), np.asarray(previous), np.asarray(layers))


def fit_predictor(samples: PredictionSamples, hidden: int = 32, epochs: int = 4, lr: float = 3e-3,
                  batch: int = 256, seed: int = 0) -> SetScorerNet:  # fmt: skip
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    _, e, f = samples.rows.shape
    flat = torch.from_numpy(samples.rows.reshape(-1, f))
    labels = torch.from_numpy(samples.truth.reshape(-1).astype(np.float32))
    net = SetScorerNet(f, hidden)
    with torch.no_grad():
        net.mean.copy_(flat.mean(dim=0))
        net.std.copy_(flat.std(dim=0).clamp_min(1e-3))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(flat)))
        for start in range(0, len(flat), batch * e):
            index = order[start : start + batch * e]
            loss = loss_fn(net(flat[index]), labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """(precision, recall) of the top-k of each row (ties: lowest expert id)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(truth, top, axis=1).sum()
    return float(hits / (k * len(truth))), float(hits / max(truth.sum(), 1))


def prediction_quality(samples: PredictionSamples, net: SetScorerNet | None, top_k: int) -> dict[str, dict]:
    """Per method: precision/recall at k overall and per target layer."""
    scorer = NumpyScorer(net) if net is not None else None
    n, e, f = samples.rows.shape
    token_missing = samples.rows[:, :, FEATURES.index("token_missing")] > 0
    methods = {
        "previous_token": samples.previous.astype(np.float64),
        "inter_layer": samples.rows[:, :, FEATURES.index("coactivation")],
        "token_table": np.where(token_missing, -np.inf, samples.rows[:, :, FEATURES.index("token")]),
        "same_layer_transition": samples.rows[:, :, FEATURES.index("transition")],
    }
    if scorer is not None:
        methods["set_predictor"] = scorer(samples.rows.reshape(-1, f).astype(np.float64)).reshape(n, e)
    out: dict[str, dict] = {}
    for name, scores in methods.items():
        valid = np.isfinite(scores).any(axis=1)
        scores = np.where(np.isfinite(scores), scores, -1e9)
        precision, recall = _at_k(scores[valid], samples.truth[valid], top_k)
        per_layer = {}
        for m in np.unique(samples.layer):
            rows = (samples.layer == m) & valid
            if rows.any():
                per_layer[int(m)] = _at_k(scores[rows], samples.truth[rows], top_k)
        out[name] = {"precision": precision, "recall": recall, "samples": int(valid.sum()), "per_layer": per_layer}
    return out
