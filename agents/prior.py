"""Score priors: a fixed map observation -> action that the PPO agent learns a residual on top of.

A PPO policy acts ``clip(prior(obs) + residual_scale * residual(obs), -1, 1)``: with the residual near zero at
the start (small initial weights) training begins at the prior's quality instead of at random prefetches, and
improves from there. Priors are pure functions of the observation, so the env wrapper and the plug-in agree:
  none:      zeros: no prefetch, ties everywhere, i.e. the cache's tie-break = LRU;
  features:  a weighted ranking ``longrun * f_longrun + decayed * f_decayed + recency * f_recency + lookahead *
             p_lookahead`` (config keys, defaults 1, 0.5, 0.1, 2; longrun alone is exactly LFU) with lookahead
             prefetch when the lookahead probability reaches ``prefetch_threshold`` (default 0.5);
  predictor: a trained activation predictor (moe_env.agents.predictor) in the checkpoint; its prefetch threshold
             is moved to ``copy_ratio`` (set by the driver: the cost model's copy ratio) as the predictor plug-in's
             (``moe_env.agents.predictor.cost_aware_threshold``; None, e.g. in the engine: as calibrated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from moe_env.agents.predictor import (
    HORIZONS,
    ActivationNet,
    cost_aware_threshold,
    predict,
    predictor_scores,
    routing_feature_index,
)

from moe_env.env import rank_scores
from moe_env.errors import CheckpointError, UsageError

PRIORS = ("none", "features", "predictor")


@dataclass
class ScorePrior:
    kind: str
    num_layers: int
    num_experts: int
    capacity: int
    config: dict[str, Any] = field(default_factory=dict)
    net: ActivationNet | None = None
    copy_ratio: float | None = None  # the cost model's copy ratio (moe_env.agents.predictor.copy_ratio); not saved

    def __post_init__(self) -> None:
        if self.kind not in PRIORS:
            raise UsageError(f"unknown prior {self.kind!r}; choose one of {', '.join(PRIORS)}")
        if self.kind == "predictor" and self.net is None:
            raise UsageError("the predictor prior needs a trained predictor (--prior-predictor PATH)")
        self._index = routing_feature_index(self.num_layers, self.num_experts)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        e = self.num_experts
        if self.kind == "none":
            return np.zeros(e, dtype=np.float64)
        if self.kind == "predictor":
            probs = predict(self.net, obs[self._index][None, :])[0]  # type: ignore[arg-type]
            threshold = cost_aware_threshold(float(self.config.get("threshold", 0.5)), self.copy_ratio,
                                             float(self.config.get("copy_ratio", 1.0)))  # fmt: skip
            return predictor_scores(probs[0], probs[1:].mean(axis=0), threshold,
                                    float(self.config.get("next_weight", 1.0)), self.capacity)  # fmt: skip
        lookahead, recency, decayed, longrun = obs[0:e], obs[6 * e : 7 * e], obs[7 * e : 8 * e], obs[8 * e : 9 * e]
        c = self.config
        keep = (
            float(c.get("longrun", 1.0)) * longrun
            + float(c.get("decayed", 0.5)) * decayed
            + float(c.get("recency", 0.1)) * recency
            + float(c.get("lookahead", 2.0)) * lookahead
        )
        scores = rank_scores(keep)
        threshold = float(self.config.get("prefetch_threshold", 0.5))
        wanted = [int(x) for x in np.argsort(-lookahead, kind="stable")[: self.capacity] if lookahead[x] >= threshold]
        for rank, expert in enumerate(wanted):
            scores[expert] = 1.0 - rank / (2.0 * self.capacity)
        return scores

    def describe(self) -> dict[str, Any]:
        out = {"kind": self.kind, **self.config}
        if self.net is not None:
            out["hidden"] = self.net.body[0].out_features
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.net is None else {f"prior.{k}": v for k, v in self.net.state_dict().items()}

    @classmethod
    def from_saved(cls, described: dict[str, Any], state: dict[str, torch.Tensor], num_layers: int,
                   num_experts: int, capacity: int, where: str) -> ScorePrior:  # fmt: skip
        config = {k: v for k, v in described.items() if k not in ("kind", "hidden")}
        kind = described.get("kind", "none")
        net = None
        if kind == "predictor":
            index = routing_feature_index(num_layers, num_experts)
            net = ActivationNet(len(index), num_experts, int(described.get("hidden", 128)))
            weights = {k[len("prior.") :]: v for k, v in state.items() if k.startswith("prior.")}
            try:
                net.load_state_dict(weights, strict=True)
            except RuntimeError:
                raise CheckpointError(f"{where}: the embedded predictor prior does not fit its network") from None
            if net.head.out_features != (1 + len(HORIZONS)) * num_experts:
                raise CheckpointError(f"{where}: the embedded predictor prior has the wrong expert count")
            net.eval()
        try:
            return cls(str(kind), num_layers, num_experts, capacity, config, net)
        except UsageError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
