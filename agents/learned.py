"""The base of the learned plug-ins: an ActionPolicy that computes its own action from the env's observation.

Outside the env (engine, simulator, ``moe-env bench``) the policy sees the same RouteEvents in the same order,
builds the same observation with the same ObservationBuilder (before the event is routed, then accounts the
event), and turns it into the same scores: so a trained policy decides identically in the env and as a plug-in.
"""

from __future__ import annotations

import numpy as np

from moe_env.env import ActionPolicy, ObservationBuilder
from moe_env.errors import CheckpointError
from moe_env.policy import CacheView, ModelSpec, RouteEvent


class LearnedPolicy(ActionPolicy):
    """LRU fallback, as in the env's default; subclasses implement ``act(obs, event, cache) -> scores [E] in
    [-1, 1]`` and ``check_model(spec, capacity)``."""

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        self.check_model(spec, capacity)
        super().reset(spec, capacity)
        self.builder = ObservationBuilder(spec, capacity)

    def check_model(self, spec: ModelSpec, capacity: int) -> None:
        raise NotImplementedError

    def act(self, obs: np.ndarray, event: RouteEvent, cache: CacheView) -> np.ndarray:
        raise NotImplementedError

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        super().observe(event, cache)
        if not event.prefill:  # the env replays prefill without decisions: so does the plug-in
            obs = self.builder.observation(event, cache)
            self.set_scores((event.layer + 1) % self.spec.num_layers, self.act(obs, event, cache))
        self.builder.update(event)


def check_obs_size(expected: int, spec: ModelSpec, capacity: int, where: str) -> None:
    size = ObservationBuilder(spec, capacity).size
    if size != expected:
        raise CheckpointError(f"{where}: network expects {expected} observation features, this model gives {size}")
