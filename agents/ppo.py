"""The ``ppo`` plug-in: the shape-agnostic eviction scorer trained by PPO (default), and the older residual PPO.

``PPOPolicy`` (``--policy ppo[:PATH]``) loads a checkpoint of the eviction-decision PPO (agents/ppo_evict_train.py):
a set scorer over candidate feature rows, run exactly as the imitation plug-in runs its scorer, so one checkpoint
runs on any (layers, experts, top-k) and budget. Given a checkpoint of the older residual PPO (below), it builds a
``ResidualPPOPolicy`` instead, so such runs stay loadable by path.

Residual PPO (PPO on MoEOffloadEnv, flat observation, one shape per checkpoint): the agent outputs a residual on a
score prior (moe_env.agents.prior): the env receives ``clip(prior(obs) + residual_scale * residual, -1, 1)``.
``ResidualActionWrapper`` applies it during training; ``ResidualPPOPolicy`` applies the same function outside the
env, from the policy-only checkpoint (actor weights, log_std, value net for completeness, the prior and its
weights): so decisions in the env and as a plug-in are identical.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from moe_env.agents.candidate_features import FEATURES, NUM_FEATURES
from moe_env.agents.checkpoint import (
    PolicyCheckpoint,
    load_checkpoint,
    save_checkpoint,
    spec_dict,
)
from moe_env.agents.configs import PPOHyperparameters, config_from_dict
from moe_env.agents.imitation import CheckpointScorerEviction
from moe_env.agents.learned import LearnedPolicy, check_obs_size
from moe_env.agents.predictor import copy_ratio
from moe_env.agents.prior import ScorePrior
from moe_env.agents.set_scorer import SetScorerNet
from stable_baselines3.common.policies import ActorCriticPolicy

from moe_env.env import MoEOffloadEnv
from moe_env.errors import CheckpointError
from moe_env.policy import CacheView, ModelSpec, RouteEvent

KIND = "ppo"
EVICT = "evict"  # config["decision"] of a shape-agnostic eviction-scorer checkpoint


def shipped_ppo_path() -> Path:
    """The shipped default: the eviction scorer PPO trained on DSV2-Lite (any shape; README "PPO")."""
    import moe_env

    return Path(moe_env.__file__).resolve().parent / "assets" / "policies" / "ppo.pt"


@dataclass
class PPOConfig(PPOHyperparameters):
    """Everything a residual-PPO run needs besides its traces (train/configs/ppo*.json hold these fields and
    PPOHyperparameters')."""

    log_std_init: float = -1.5
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    residual_scale: float = 1.0
    prior: str = "features"  # none | features | predictor
    prior_predictor: str = ""  # checkpoint of the predictor prior ("" = the shipped one)
    prior_config: dict[str, Any] = field(default_factory=dict)
    reward: str = "stall"  # stall | stall_vs_lru
    capacity: int | None = None  # slots per layer; None = half the experts

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PPOConfig:
        return config_from_dict(cls, values, "PPO config")


class ResidualActionWrapper(gym.Wrapper):
    """Env action = clip(prior(last observation) + scale * agent action, -1, 1)."""

    def __init__(self, env: MoEOffloadEnv, prior: ScorePrior, scale: float):
        super().__init__(env)
        self.prior = prior
        self.scale = scale
        self._obs: np.ndarray | None = None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._obs = obs
        return obs, info

    def step(self, action):
        full = combine(self.prior(self._obs), np.asarray(action, dtype=np.float64), self.scale)
        obs, reward, terminated, truncated, info = self.env.step(full.astype(np.float32))
        self._obs = obs
        return obs, reward, terminated, truncated, info


def combine(prior: np.ndarray, residual: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(prior + scale * np.clip(residual, -1.0, 1.0), -1.0, 1.0)


def actor_critic(obs_size: int, num_experts: int, config: PPOConfig) -> ActorCriticPolicy:
    """The SB3 network of a PPO policy, rebuilt identically at load time."""
    return ActorCriticPolicy(
        gym.spaces.Box(0.0, 1.0, shape=(obs_size,), dtype=np.float32),
        gym.spaces.Box(-1.0, 1.0, shape=(num_experts,), dtype=np.float32),
        lambda _: 0.0,
        net_arch=dict(pi=list(config.net_arch), vf=list(config.net_arch)),
        log_std_init=config.log_std_init,
    )


def policy_checkpoint(policy: ActorCriticPolicy, prior: ScorePrior, config: PPOConfig, spec: ModelSpec,
                      capacity: int) -> PolicyCheckpoint:  # fmt: skip
    state = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    state.update(prior.state_dict())
    described = asdict(config) | {"prior_described": prior.describe()}
    obs_size = MoEOffloadEnv.observation_size(spec)
    return PolicyCheckpoint(KIND, spec_dict(spec), capacity, obs_size, described, state)


def save_ppo_policy(policy: ActorCriticPolicy, prior: ScorePrior, config: PPOConfig, spec: ModelSpec,
                    capacity: int, path: str | os.PathLike) -> Path:  # fmt: skip
    return save_checkpoint(policy_checkpoint(policy, prior, config, spec, capacity), path)


class ResidualPPOPolicy(LearnedPolicy):
    """``--policy ppo:PATH[,copy_ratio=R]`` for a residual PPO checkpoint (deterministic: the Gaussian's mean).
    A predictor prior's prefetch threshold follows the bound cost model (or ``copy_ratio``)."""

    def __init__(self, path: str | os.PathLike, copy_ratio: float | None = None):
        super().__init__()  # LRU fallback, as the env's default
        self.copy_ratio = None if copy_ratio is None else float(copy_ratio)
        self._cost = None
        self.path = Path(path)  # none ships any more: the shipped ppo is the shape-agnostic PPOPolicy
        where = str(self.path)
        self.ckpt = load_checkpoint(self.path, KIND)
        saved = dict(self.ckpt.config)
        described = saved.pop("prior_described", {"kind": "none"})
        try:
            self.config = PPOConfig.from_dict(saved)
        except Exception as exc:  # UsageError or TypeError from a foreign config
            raise CheckpointError(f"{where}: bad PPO config in the checkpoint ({exc})") from None
        m = self.ckpt.model
        self.net = actor_critic(self.ckpt.obs_size, m["num_experts"], self.config)
        weights = {k[len("policy.") :]: v for k, v in self.ckpt.state_dict.items() if k.startswith("policy.")}
        try:
            self.net.load_state_dict(weights, strict=True)
        except RuntimeError:
            raise CheckpointError(f"{where}: the weights do not fit the PPO network of its config") from None
        self.net.eval()
        self.prior = ScorePrior.from_saved(
            described, self.ckpt.state_dict, m["num_layers"], m["num_experts"], self.ckpt.capacity, where
        )

    def check_model(self, spec: ModelSpec, capacity: int) -> None:
        self.ckpt.check_spec(spec, str(self.path))
        check_obs_size(self.ckpt.obs_size, spec, capacity, str(self.path))
        self.prior.capacity = capacity
        ratio = self.copy_ratio
        if ratio is None and self._cost is not None:
            ratio = copy_ratio(self._cost, spec.top_k)
        self.prior.copy_ratio = ratio

    def bind_cost_model(self, cost) -> None:
        self._cost = cost

    def residual(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(obs, dtype=torch.float32)[None, :]
            latent = self.net.mlp_extractor.forward_actor(self.net.extract_features(x, self.net.pi_features_extractor))
            return self.net.action_net(latent)[0].numpy().astype(np.float64)

    def act(self, obs: np.ndarray, event: RouteEvent, cache: CacheView) -> np.ndarray:
        return combine(self.prior(obs), self.residual(obs), self.config.residual_scale)


# --------------------------------------------------------------------------- the shape-agnostic eviction scorer


def is_eviction_checkpoint(ckpt: PolicyCheckpoint) -> bool:
    return ckpt.config.get("decision") == EVICT


def save_eviction_ppo(net: SetScorerNet, described: dict[str, Any], path: str | os.PathLike) -> Path:
    """The actor's SetScorerNet as a shape-agnostic ``ppo`` checkpoint (the imitation checkpoint's layout)."""
    config = dict(described) | {"decision": EVICT, "features": list(FEATURES), "hidden": net.body[0].out_features}
    model = {"name": "", "num_layers": 0, "num_experts": 0, "top_k": 0}  # shape-agnostic
    return save_checkpoint(PolicyCheckpoint(KIND, model, 0, NUM_FEATURES, config, net.state_dict()), path)


class PPOPolicy(CheckpointScorerEviction):
    """``--policy ppo[:PATH][,tables=PATH|none]``: the PPO-trained eviction scorer (no PATH: the shipped one, any
    shape). Model tables as the imitation plug-in's: the shipped ones of the model's shape unless given. A residual
    PPO checkpoint builds a ResidualPPOPolicy (its ``copy_ratio`` argument is accepted there only)."""

    def __new__(cls, path: str | os.PathLike | None = None, **kwargs: Any):
        if path is not None and not is_eviction_checkpoint(load_checkpoint(path, KIND)):
            return ResidualPPOPolicy(path, **kwargs)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike | None = None, tables: str | None = None):
        super().__init__(Path(path) if path else shipped_ppo_path(), KIND, tables)
