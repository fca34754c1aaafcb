"""The SB3 policy of the eviction-decision PPO: the imitation set scorer as actor, a pooled value head as critic.

The observation (agents/eviction_env.py) is [max_candidates, F + 1]: feature rows plus a mask column. The actor
applies one SetScorerNet (agents/set_scorer.py, weights shared across candidates) to every row; the logits of the
categorical over candidates are minus the keep scores (the lowest score is evicted, as in the plug-in), padding
masked out. The critic embeds each standardised row, mean-pools over the real candidates and feeds SB3's value
head. So the actor's weights are exactly a SetScorerNet's: initialised from the imitation checkpoint, saved back
as one, and run as a plug-in with the imitation policy's numpy scorer on any shape.
"""

from __future__ import annotations

import torch
from moe_env.agents.set_scorer import SetScorerNet
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

MASKED_LOGIT = -1e9


class CandidateActorCritic(nn.Module):
    """SB3's ``mlp_extractor``: flattened observation -> (masked candidate logits, pooled value latent)."""

    def __init__(self, num_features: int, max_candidates: int, hidden: int, value_hidden: int):
        super().__init__()
        self.num_features, self.max_candidates = num_features, max_candidates
        self.scorer = SetScorerNet(num_features, hidden)
        self.value_embed = nn.Sequential(nn.Linear(num_features, value_hidden), nn.ReLU())
        self.latent_dim_pi = max_candidates
        self.latent_dim_vf = value_hidden + 1  # pooled embedding and the share of real candidates

    def _split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features.reshape(-1, self.max_candidates, self.num_features + 1)
        return x[..., : self.num_features], x[..., self.num_features] > 0.5

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        rows, mask = self._split(features)
        return torch.where(mask, -self.scorer(rows), torch.full_like(mask, MASKED_LOGIT, dtype=rows.dtype))

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        rows, mask = self._split(features)
        scale = self.scorer
        h = self.value_embed((rows - scale.mean) / scale.std) * mask[..., None]
        count = mask.sum(dim=1, keepdim=True).clamp_min(1)
        return torch.cat([h.sum(dim=1) / count, count / self.max_candidates], dim=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


class SetScorerPolicy(ActorCriticPolicy):
    """ActorCriticPolicy whose actor is a SetScorerNet over the candidate rows (``policy_kwargs``: hidden,
    value_hidden; SB3 stores them, so ``PPO.load`` rebuilds the same network)."""

    def __init__(self, observation_space, action_space, lr_schedule, hidden: int = 32, value_hidden: int = 32,
                 **kwargs):  # fmt: skip
        self.hidden, self.value_hidden = hidden, value_hidden
        kwargs.setdefault("ortho_init", False)  # the actor starts from imitation weights: SB3 must not re-init them
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build_mlp_extractor(self) -> None:
        max_candidates, width = self.observation_space.shape
        self.mlp_extractor = CandidateActorCritic(width - 1, max_candidates, self.hidden, self.value_hidden)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self.action_net = nn.Identity()  # the logits are the scorer's: no extra layer between them and the policy
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict:
        return super()._get_constructor_parameters() | {"hidden": self.hidden, "value_hidden": self.value_hidden}

    @property
    def scorer(self) -> SetScorerNet:
        return self.mlp_extractor.scorer
