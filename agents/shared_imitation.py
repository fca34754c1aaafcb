"""Imitation of Belady in one pool shared by every layer (``--allocation shared``): the decisions and the plug-in.

In a shared pool the cache (moe_env/cache.py ``_python_victim``) asks the policy for ``eviction_scores(layer,
candidates, cache)`` once per layer that has candidates, all at one ``cache.clock``, and evicts the lowest score
over every layer. ``SharedDecisionCollector`` groups those per-layer calls by the clock into ONE decision (every
layer's candidates, in layer order) labelled with Belady's shared-pool choice: the candidates with the farthest
next use on the one cache clock, as policies/belady.py ranks across layers. The set scorer is trained listwise
over that whole cross-layer set (agents/set_scorer.py), so the level of its scores is trained across layers, which
a listwise loss within one layer leaves free. Its features are comparable across layers: recency and resident age
count tokens (every layer routes once per token) and cache accesses on the global clock, and the layer's position
is a column. A checkpoint trained on such decisions records them (``decisions`` holds "shared",
agents/checkpoint.py) and only such a checkpoint ranks across layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from moe_env.agents.candidate_features import ModelTables
from moe_env.agents.cross_layer_scores import CrossLayerScores
from moe_env.agents.imitation import DecisionCollector, ImitationPolicy, belady_labels
from moe_env.agents.set_scorer import Decisions, NumpyScorer

from moe_env.policy import CacheView


def shipped_shared_path() -> Path:
    import moe_env

    return Path(moe_env.__file__).resolve().parent / "assets" / "policies" / "imitation-shared.pt"


class SharedImitationPolicy(ImitationPolicy):
    """``--policy imitation-shared[:PATH][,tables=PATH|none]``: the imitation scorer trained on shared-pool
    decisions (moe_env/assets/policies/imitation-shared.pt unless PATH); it runs under every allocation."""

    def __init__(self, path: str | os.PathLike | None = None, tables: str | None = None):
        super().__init__(path or shipped_shared_path(), tables)


class _Decision:
    """One shared-pool eviction being asked layer by layer."""

    __slots__ = ("clock", "distances", "last_layer", "oracle", "record", "rows", "scores")

    def __init__(self, clock: int, record: bool, oracle: bool):
        self.clock, self.record, self.oracle = clock, record, oracle
        self.last_layer = -1
        self.rows: list[np.ndarray] = []
        self.distances: list[np.ndarray] = []  # next use of every candidate asked (record or learner)
        self.scores: list[np.ndarray] = []  # the learner's, for its agreement with Belady


class SharedDecisionCollector(DecisionCollector):
    """Records (every layer's candidate rows, Belady's shared-pool label) at each eviction of a shared pool and
    evicts as ``behaviour`` says (belady, lru, or the learner with the oracle taking a share ``beta``)."""

    ranks_across_layers = True

    def __init__(self, behaviour: str, scorer: NumpyScorer | None = None, beta: float = 0.0,
                 keep: float = 1.0, tables: ModelTables | None = None, seed: int = 0,
                 signal_dropout: float = 0.0):  # fmt: skip
        super().__init__(behaviour, scorer, beta, keep, tables, seed, signal_dropout)
        self._open: _Decision | None = None
        self._across = CrossLayerScores(scorer) if scorer is not None else None  # the learner's scores

    def begin_sequence(self, cache: CacheView) -> None:
        self._close()  # a cold sequence restarts the clock: never merge its first eviction into the last one
        super().begin_sequence(cache)

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        decision = self._open
        # the cache asks each layer once per eviction, in ascending layer order, at one clock
        if decision is None or decision.clock != cache.clock or layer <= decision.last_layer:
            self._close()
            decision = self._open = _Decision(cache.clock, self.rng.random() < self.keep, self.rng.random() < self.beta)
        decision.last_layer = layer
        next_use = None
        if decision.record or self.behaviour != "lru":
            next_use = np.array([cache.next_use(layer, int(e)) for e in candidates], dtype=np.float64)
            decision.distances.append(next_use)
        if decision.record:
            decision.rows.append(self.features.rows(layer, candidates, cache).astype(np.float32))
        if self.behaviour == "belady":
            return -next_use
        if self.behaviour == "lru":
            return cache.last_use(layer)[candidates].astype(np.float64)
        scores = self._across.scores(layer, candidates, cache)
        decision.scores.append(scores)
        return -next_use if decision.oracle else scores

    def _close(self) -> None:
        decision, self._open = self._open, None
        if decision is None or not decision.distances:
            return
        distances = np.concatenate(decision.distances)
        if len(distances) < 2:  # one candidate in the whole pool: nothing was chosen
            return
        labels = belady_labels(distances)
        if decision.scores:
            self.decisions += 1
            self.agree += bool(labels[int(np.argmin(np.concatenate(decision.scores)))])
        if decision.record:
            self.rows.append(np.concatenate(decision.rows))
            self.targets.append(labels)
            self.distances.append(distances.astype(np.float32))

    def decisions_recorded(self) -> Decisions:
        self._close()
        return super().decisions_recorded()
