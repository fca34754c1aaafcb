"""The flat expert-activation predictor and its plug-in policy (``--policy flat-predictor:PATH``).

Flat: it reads the env's observation vector, so a checkpoint runs on one shape (the shipped one: tiny-mixtral);
it is the PPO ``predictor`` prior. The shape-agnostic prefetcher ``--prefetch predictor`` is
agents/prefetch_predictor.py (it reuses ``copy_ratio`` and ``cost_aware_threshold`` from here).

At the env's decision point (layer l routed, target layer m = l + 1, or layer 0 of the next token) the network
reads the routing part of the observation (lookahead and gate probs, current selection, the target layer's
previous selection, recency, decayed frequency, layer one-hot; NOT the cache masks, which depend on whichever
policy produced the data) and outputs, per expert of the target layer,
  p_now:  the probability that the target layer routes to it at its coming token (what to prefetch), and
  p_h:    for h in HORIZONS, the probability that the target layer routes to it within the h tokens after
          (a learned, Belady-flavoured signal of how soon it is needed again: what to keep).
The policy prefetches the experts with p_now >= threshold (best first) and evicts the lowest
p_now + next_weight * mean_h p_h.

The threshold is cost-aware (``cost_aware_threshold``): a right prefetch saves at most the lead it has over the
demand load it replaces (one layer's compute) and at most one copy, a wrong one delays the demand loads queued
behind it on the FIFO link by up to one copy; so the break-even odds p / (1 - p) grow with
copy_ratio = copy time / min(copy time, one layer's compute). The calibrated threshold fixes the constant at the
calibration profile's ratio; under a driver that binds its cost model (the simulator, ``moe-env bench``, the env)
the threshold moves with the ratio of the profile in use (e.g. 0.4 -> 0.87 for Mixtral-sized 4-bit experts on
PCIe 4, where a copy costs ~10 layers of compute). An explicit ``threshold=`` is used as given.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from moe_env.agents.checkpoint import (
    PolicyCheckpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    shipped_policy_path,
    spec_dict,
)
from moe_env.agents.learned import LearnedPolicy, check_obs_size
from torch import nn

from moe_env.env import MoEOffloadEnv, action_from_policy, rank_scores
from moe_env.errors import CheckpointError
from moe_env.policy import CacheView, ModelSpec, RouteEvent, make_policy
from moe_env.sim import cost_model_for
from moe_env.trace import Trace

KIND = "predictor"
HORIZONS = (1, 2, 4, 8, 16)  # tokens after the coming one


def routing_feature_index(num_layers: int, num_experts: int) -> np.ndarray:
    """Observation indices the predictor reads: everything except the cache-state features."""
    e = num_experts
    keep = list(range(0, 4 * e)) + list(range(6 * e, 9 * e + num_layers + 2))
    return np.asarray(keep, dtype=np.int64)


class ActivationNet(nn.Module):
    def __init__(self, num_features: int, num_experts: int, hidden: int = 128):
        super().__init__()
        self.num_experts = num_experts
        self.body = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, (1 + len(HORIZONS)) * num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, 1 + len(HORIZONS), E]: row 0 is the coming token, row 1 + i is within HORIZONS[i] after."""
        return self.head(self.body(x)).view(-1, 1 + len(HORIZONS), self.num_experts)


@dataclass
class PredictorConfig:
    hidden: int = 128
    epochs: int = 40
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    threshold: float = 0.5  # prefetch an expert when p_now >= threshold
    next_weight: float = 1.0  # eviction keeps the highest p_now + next_weight * mean_h p_h
    seed: int = 0


@dataclass
class Samples:
    features: np.ndarray  # [N, F]
    labels: np.ndarray  # [N, 1 + len(HORIZONS), E] multi-hot: the coming token, then within each horizon
    lookahead: np.ndarray  # [N, E] lookahead probs (zeros when absent)
    previous: np.ndarray  # [N, E] the target layer's previous-token selection


def collect_samples(trace: Trace, capacity: int, profile: str | None) -> Samples:
    """Walk every decode decision of `trace` in the env (LRU keeps the cache going) and label it from the trace."""
    env = MoEOffloadEnv(trace, capacity=capacity, profile=profile, reference_metrics=False)
    spec = env.model_spec
    e = spec.num_experts
    index = routing_feature_index(spec.num_layers, e)
    lru = make_policy("lru")
    lru.reset(spec, env.capacity)
    rows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for i, sequence in enumerate(trace.sequences):
        obs, _ = env.reset(options={"sequence": i})
        done = False
        while not done:
            event = env.current_event
            m = (event.layer + 1) % spec.num_layers
            t = event.step + (1 if m == 0 else 0)
            rows.append(obs)
            labels.append(_labels(sequence.experts, t, m, e))
            obs, _, done, _, _ = env.step(action_from_policy(lru, event, env.cache))
    obs_all = np.asarray(rows, dtype=np.float32)
    return Samples(
        features=obs_all[:, index],
        labels=np.asarray(labels, dtype=np.float32),
        lookahead=obs_all[:, 0:e],
        previous=obs_all[:, 3 * e : 4 * e],
    )


def _labels(experts: np.ndarray, token: int, layer: int, num_experts: int) -> np.ndarray:
    """Row 0: the experts at `token`; row 1 + i: any use in tokens token + 1 .. token + HORIZONS[i]."""
    rows = np.zeros((1 + len(HORIZONS), num_experts), dtype=np.float32)
    rows[0] = _multi_hot(_experts_at(experts, token, layer), num_experts)
    seen = np.zeros(num_experts, dtype=np.float32)
    ahead = 1
    for i, horizon in enumerate(HORIZONS):
        while ahead <= horizon:
            seen = np.maximum(seen, _multi_hot(_experts_at(experts, token + ahead, layer), num_experts))
            ahead += 1
        rows[1 + i] = seen
    return rows


def _experts_at(experts: np.ndarray, step: int, layer: int) -> tuple[int, ...] | None:
    if not 0 <= step < experts.shape[0] or experts[step, layer, 0] < 0:
        return None
    return tuple(int(x) for x in experts[step, layer])


def _multi_hot(experts: Iterable[int] | None, n: int) -> np.ndarray:
    row = np.zeros(n, dtype=np.float32)
    if experts is not None:
        row[list(experts)] = 1.0
    return row


def train_predictor(train: Samples, config: PredictorConfig, log=print) -> ActivationNet:
    torch.manual_seed(config.seed)
    num_experts = train.labels.shape[2]
    net = ActivationNet(train.features.shape[1], num_experts, config.hidden)
    x = torch.from_numpy(train.features)
    y = torch.from_numpy(train.labels)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = loss_fn(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        if epoch % 10 == 9 or epoch == config.epochs - 1:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {total / len(x):.4f}")
    return net.eval()


def predict(net: ActivationNet, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(net(torch.from_numpy(np.asarray(features, dtype=np.float32)))).numpy()


def topk_precision_recall(scores: np.ndarray, truth: np.ndarray, k: int, valid: np.ndarray | None = None) -> dict:
    """Top-k of `scores` vs the true multi-hot rows: precision = hits / k, recall = hits / |truth|."""
    rows = np.ones(len(truth), dtype=bool) if valid is None else valid
    if not rows.any():
        return {"precision": float("nan"), "recall": float("nan"), "samples": 0}
    top = np.argsort(-scores[rows], axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(truth[rows], top, axis=1).sum()
    return {
        "precision": float(hits / (k * rows.sum())),
        "recall": float(hits / max(truth[rows].sum(), 1)),
        "samples": int(rows.sum()),
    }


def prediction_report(net: ActivationNet, samples: Samples, top_k: int) -> dict[str, dict]:
    """The predictor against the lookahead gate and against 'same experts as the previous token'."""
    probs = predict(net, samples.features)
    now = samples.labels[:, 0]
    has_lookahead = samples.lookahead.sum(axis=1) > 0
    has_previous = samples.previous.sum(axis=1) > 0
    return {
        "predictor": topk_precision_recall(probs[:, 0], now, top_k),
        "predictor_where_lookahead": topk_precision_recall(probs[:, 0], now, top_k, has_lookahead),
        "lookahead_gate": topk_precision_recall(samples.lookahead, now, top_k, has_lookahead),
        "predictor_where_previous": topk_precision_recall(probs[:, 0], now, top_k, has_previous),
        "previous_token": topk_precision_recall(samples.previous, now, top_k, has_previous),
    }


def save_predictor(net: ActivationNet, config: PredictorConfig, spec: ModelSpec, capacity: int, path) -> Path:
    size = MoEOffloadEnv.observation_size(spec)
    ckpt = PolicyCheckpoint(KIND, spec_dict(spec), capacity, size, asdict(config), net.state_dict())
    return save_checkpoint(ckpt, path)


def copy_ratio(cost, top_k: int) -> float:
    """copy time / min(copy time, one layer's compute) >= 1: how many times a wrong prefetch's cost on the link
    exceeds what a right one can save (a prefetch is issued about one layer ahead of the demand load)."""
    lead = cost.layer_compute_s + top_k * cost.expert_compute_s
    return max(cost.copy_s / max(min(cost.copy_s, lead), 1e-12), 1.0)


def cost_aware_threshold(threshold: float, ratio: float | None, calibrated_ratio: float = 1.0) -> float:
    """The prefetch threshold calibrated at copy ratio `calibrated_ratio`, moved to copy ratio `ratio`.

    Prefetch iff p * saving >= (1 - p) * beta * copy, i.e. odds(p) >= beta * ratio; the calibrated threshold
    gives beta, the profile gives ratio. Thresholds outside (0, 1) (e.g. 1.01: never prefetch) are kept."""
    if ratio is None or ratio == calibrated_ratio or not 0.0 < threshold < 1.0:
        return threshold
    odds = threshold / (1.0 - threshold) * ratio / max(calibrated_ratio, 1e-12)
    return odds / (1.0 + odds)


class PredictorPolicy(LearnedPolicy):
    """``--policy flat-predictor[:PATH][,threshold=0.5][,next_weight=0.5][,copy_ratio=R][,cost_aware=False]``; no PATH:
    the shipped tiny-mixtral one. Without ``threshold`` the calibrated one, moved to the bound cost model's copy
    ratio (or to ``copy_ratio``, e.g. in the engine, which has no cost model); ``cost_aware=False``: as calibrated."""

    def __init__(self, path: str | os.PathLike | None = None, threshold: float | None = None,
                 next_weight: float | None = None, copy_ratio: float | None = None,
                 cost_aware: bool = True):  # fmt: skip
        super().__init__()  # LRU fallback, as the env's default
        self.path = Path(path) if path else shipped_policy_path(KIND)
        self.ckpt = load_checkpoint(self.path, KIND)
        config = self.ckpt.config
        try:
            hidden = int(config.get("hidden", 128))
            self.threshold = float(config.get("threshold", 0.5) if threshold is None else threshold)
            self.next_weight = float(config.get("next_weight", 0.5) if next_weight is None else next_weight)
            self.calibrated_ratio = float(config.get("copy_ratio", 1.0))
            self.copy_ratio = None if copy_ratio is None else float(copy_ratio)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: bad predictor config ({exc})") from None
        self.base_threshold = self.threshold
        self.adapt = threshold is None and bool(cost_aware)
        self._cost = None
        m = self.ckpt.model
        self.index = routing_feature_index(m["num_layers"], m["num_experts"])
        self.net = ActivationNet(len(self.index), m["num_experts"], hidden)
        load_weights(self.net, self.ckpt, self.path)
        self.net.eval()

    def check_model(self, spec: ModelSpec, capacity: int) -> None:
        self.ckpt.check_spec(spec, str(self.path))
        check_obs_size(self.ckpt.obs_size, spec, capacity, str(self.path))

    def bind_cost_model(self, cost) -> None:
        self._cost = cost

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        super().reset(spec, capacity)
        if self.adapt:
            ratio = self.copy_ratio
            if ratio is None and self._cost is not None:
                ratio = copy_ratio(self._cost, spec.top_k)
            self.threshold = cost_aware_threshold(self.base_threshold, ratio, self.calibrated_ratio)

    def act(self, obs: np.ndarray, event: RouteEvent, cache: CacheView) -> np.ndarray:
        probs = predict(self.net, obs[self.index][None, :])[0]
        return predictor_scores(probs[0], probs[1:].mean(axis=0), self.threshold, self.next_weight, cache.capacity)


def predictor_scores(p_now: np.ndarray, p_later: np.ndarray, threshold: float, next_weight: float,
                     capacity: int) -> np.ndarray:  # fmt: skip
    """Action scores: eviction order by p_now + w * p_later in [-1, 0); prefetches (p_now >= threshold, at most
    `capacity`, best first) in (0, 1]."""
    scores = rank_scores(p_now + next_weight * p_later)
    wanted = [int(x) for x in np.argsort(-p_now, kind="stable")[:capacity] if p_now[x] >= threshold]
    for rank, expert in enumerate(wanted):
        scores[expert] = 1.0 - rank / (2.0 * capacity)
    return scores


THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.01)  # 1.01: never prefetch (eviction only)
NEXT_WEIGHTS = (0.5, 1.0, 2.0)


def calibrate(path: Path, validation: Trace, capacity: int, profile: str | None, log=print) -> tuple[float, float]:
    """(threshold, next_weight) with the lowest stall per token on `validation`; written back into the checkpoint."""
    from moe_env.sim import simulate

    best: tuple[float, float, float] | None = None
    for threshold in THRESHOLDS:
        for weight in NEXT_WEIGHTS:
            result = simulate(validation, PredictorPolicy(path, threshold, weight), capacity, profile)
            if best is None or result.stall_s_per_token < best[0]:
                best = (result.stall_s_per_token, threshold, weight)
    assert best is not None
    ratio = copy_ratio(cost_model_for(validation.meta, profile), validation.meta.top_k)
    ckpt = load_checkpoint(path, KIND)
    ckpt.config.update(threshold=best[1], next_weight=best[2], copy_ratio=ratio)
    save_checkpoint(ckpt, path)
    log(
        f"calibrated on validation: threshold {best[1]}, next_weight {best[2]} ({1e3 * best[0]:.3f} ms/token, "
        f"copy ratio {ratio:.2f})"
    )
    return best[1], best[2]
