"""Set-scorer scores of every layer's residents at once, kept up to date per event: what a shared pool asks for.

A shared pool asks the policy for each layer's candidates at every eviction (26 layers on DeepSeek-V2-Lite), and
building one layer's feature rows costs far more than scoring them. Within a token, an event of layer l changes
the rows of layers l (its own state) and l + 1 (co-activation with l, lookahead from l) only; a new decode step,
token or gate-weight flag changes every layer's; the resident age moves with the clock for all. So the rows of
each layer are rebuilt only when one of those changed, the resident age is recomputed for every resident, and
all residents are scored in one call. The rows equal CandidateFeatures.layer_rows at every eviction
(tests/test_imitation_shared.py checks it, so a feature that reads other state shows up there).
"""

from __future__ import annotations

import numpy as np
from moe_env.agents.candidate_features import FEATURES, NUM_FEATURES, CandidateFeatures
from moe_env.agents.feature_kernel import resident_ages_into
from moe_env.agents.set_scorer import NumpyScorer

from moe_env.policy import CacheView

_AGE = FEATURES.index("resident_age")


class CrossLayerScores:
    """``scores(layer, candidates, cache)`` for the features' current event; ``observe(layer)`` after each update,
    ``begin(features)`` at each sequence start."""

    def __init__(self, scorer: NumpyScorer):
        self.scorer = scorer
        self.features: CandidateFeatures | None = None

    def begin(self, features: CandidateFeatures) -> None:
        spec = features.spec
        self.features = features
        self._rows = np.zeros((spec.num_layers, spec.num_experts, NUM_FEATURES))
        self._dirty = np.ones(spec.num_layers, dtype=bool)
        self._key: tuple | None = None
        self._scores: np.ndarray | None = None

    def observe(self, layer: int) -> None:
        self._dirty[layer : layer + 2] = True
        self._scores = None

    def scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        if self._scores is None:
            self._scores = self._score_all(cache)
        return self._scores[layer, candidates]

    def rows(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        """The rows that were scored for `candidates` (resident experts of `layer`) at this event."""
        self.scores(layer, candidates, cache)
        return self._scored_rows[self._row_of[layer, candidates]]

    def _score_all(self, cache: CacheView) -> np.ndarray:
        features = self.features
        spec = features.spec
        key = (features.step, features.token, features.has_weight)
        if key != self._key:
            self._key = key
            self._dirty[:] = True
        for layer in np.flatnonzero(self._dirty).tolist():
            self._rows[layer] = features.layer_rows(layer, cache)
        self._dirty[:] = False
        loaded = np.stack([cache.loaded_at(layer) for layer in range(spec.num_layers)])
        resident = loaded >= 0
        rows = self._rows[resident]
        per_token = spec.num_layers * spec.top_k
        ages = np.empty(len(rows))
        resident_ages_into(features.clock, loaded[resident], per_token, ages)
        rows[:, _AGE] = ages
        self._scored_rows = rows
        self._row_of = np.cumsum(resident).reshape(resident.shape) - 1
        scores = np.zeros(resident.shape)
        if len(rows):  # one call for every layer: the scorer scores each row on its own (scorer_kernel)
            scores[resident] = self.scorer(rows)
        return scores
