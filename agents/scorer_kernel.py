"""The set scorer's forward pass as compiled code: NumpyScorer's one implementation (agents/set_scorer.py) and the
one agents/scored_replay.py calls inside its replay loop.

Each row is scored on its own, in a fixed order of operations, so a row's score does not depend on which other
rows share the call (a BLAS product may round a row differently with the batch): the per-event plug-in, which
scores a layer's rows, and the compiled replay, which scores only the candidates, agree to the last bit.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, error_model="numpy")
def score_rows(rows, n, mean, inv_std, clip, w1, b1, w2, b2, w3, b3, out):  # pragma: no cover - compiled
    """out[:n] = the scores of rows[:n]: clip((x - mean) * inv_std) -> linear, ReLU -> linear, ReLU -> linear.
    Weights are [in, out] (a Linear's weight transposed)."""
    num_features, hidden1, hidden2 = w1.shape[0], w1.shape[1], w2.shape[1]
    x = np.empty(num_features)
    h1 = np.empty(hidden1)
    h2 = np.empty(hidden2)
    for r in range(n):
        for f in range(num_features):
            v = (rows[r, f] - mean[f]) * inv_std[f]
            if v < -clip:
                v = -clip
            elif v > clip:
                v = clip
            x[f] = v
        h1[:] = 0.0
        for f in range(num_features):
            v = x[f]
            for j in range(hidden1):
                h1[j] += v * w1[f, j]
        for j in range(hidden1):
            v = h1[j] + b1[j]
            h1[j] = 0.0 if v < 0.0 else v
        h2[:] = 0.0
        for i in range(hidden1):
            v = h1[i]
            if v == 0.0:  # a ReLU zero adds +-0.0 to sums that are never -0.0: skipping it changes no bit
                continue
            for j in range(hidden2):
                h2[j] += v * w2[i, j]
        score = 0.0
        for j in range(hidden2):
            v = h2[j] + b2[j]
            score += (0.0 if v < 0.0 else v) * w3[j, 0]
        out[r] = score + b3[0]
