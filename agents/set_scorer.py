"""The set scorer: one small MLP applied to each candidate's own feature row (weights shared across experts and
layers), trained with a listwise loss over the candidates of each decision. Inference is plain numpy (one
batched call per decision: a handful of matmuls on a [C, F] matrix), so a plug-in never pays torch's per-call
overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# standardised inputs are clipped: a feature far outside its training range (a signal rarely seen present) moves a
# score by a bounded amount rather than by thousands of standard deviations
CLIP = 8.0
# a column constant in training carries no information the scorer could have learned: this std zeroes it out, so
# a trace where it varies (a signal present here, always absent in training) is scored as in training
IGNORED_STD = 1e6


class SetScorerNet(nn.Module):
    """[N, F] standardised features -> [N] keep scores (the lowest is evicted)."""

    def __init__(self, num_features: int, hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.body = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(((x - self.mean) / self.std).clamp(-CLIP, CLIP)).squeeze(-1)


def widen_scorer(net: SetScorerNet, columns: list[int], num_features: int) -> SetScorerNet:
    """The same function on wider rows: `net` read columns `columns` of a `num_features`-wide row; the others get
    zero input weights and the ignored standardisation, so they cannot move a score (an older checkpoint, trained
    before columns were added, scores the new rows as it scored its own)."""
    wide = SetScorerNet(num_features, net.body[0].out_features)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    index = torch.as_tensor(columns, dtype=torch.long)
    mean, std = torch.zeros(num_features), torch.full((num_features,), IGNORED_STD)
    mean[index], std[index] = state.pop("mean"), state.pop("std")
    weight = torch.zeros(net.body[0].out_features, num_features)
    weight[:, index] = state.pop("body.0.weight")
    wide.load_state_dict(state | {"mean": mean, "std": std, "body.0.weight": weight}, strict=True)
    return wide.eval()


class NumpyScorer:
    """The same function as a SetScorerNet, in float64 (bit-for-bit deterministic, no torch per call): the
    compiled forward of agents/scorer_kernel.py, each row scored on its own."""

    def __init__(self, net: SetScorerNet):
        state = {k: v.detach().double().numpy() for k, v in net.state_dict().items()}
        self.mean, self.inv_std = state["mean"], 1.0 / state["std"]
        linears = sorted({k.rsplit(".", 1)[0] for k in state if k.startswith("body.")}, key=lambda s: int(s[5:]))
        self.layers = [(state[f"{name}.weight"].T.copy(), state[f"{name}.bias"]) for name in linears]
        if len(self.layers) != 3:
            raise ValueError(f"a set scorer has 3 linear layers, this one {len(self.layers)}")

    def weights(self) -> tuple[np.ndarray, ...]:
        """(mean, inv_std, clip, w1, b1, w2, b2, w3, b3): the compiled forward's arguments after rows and n."""
        (w1, b1), (w2, b2), (w3, b3) = self.layers
        return self.mean, self.inv_std, CLIP, w1, b1, w2, b2, w3, b3

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        from moe_env.agents.scorer_kernel import score_rows  # numba: imported when first scoring

        rows = np.ascontiguousarray(rows, dtype=np.float64)
        out = np.empty(len(rows))
        score_rows(rows, len(rows), *self.weights(), out)
        return out


@dataclass
class Decisions:
    """Ragged listwise data: decision i owns rows offsets[i]:offsets[i+1]; `target` marks the rows to evict."""

    rows: np.ndarray  # [R, F] float32
    target: np.ndarray  # [R] bool: Belady's choice (ties: every candidate with the farthest next use)
    offsets: np.ndarray  # [N + 1] int64
    distance: np.ndarray | None = None  # [R] float32: accesses until the candidate's next use (inf: never)

    @property
    def size(self) -> int:
        return len(self.offsets) - 1

    @staticmethod
    def concat(parts: list[Decisions]) -> Decisions:
        parts = [p for p in parts if p.size]
        if not parts:
            return Decisions(np.zeros((0, 0), np.float32), np.zeros(0, bool), np.zeros(1, np.int64), np.zeros(0))
        offsets = [parts[0].offsets]
        base = parts[0].offsets[-1]
        for p in parts[1:]:
            offsets.append(p.offsets[1:] + base)
            base += p.offsets[-1]
        distance = None if any(p.distance is None for p in parts) else np.concatenate([p.distance for p in parts])
        return Decisions(
            np.concatenate([p.rows for p in parts]),
            np.concatenate([p.target for p in parts]),
            np.concatenate(offsets),
            distance,
        )

    def select(self, decisions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, decision id per row, renumbered 0..len-1) of the given decisions."""
        starts, ends = self.offsets[decisions], self.offsets[decisions + 1]
        lengths = ends - starts
        seg = np.repeat(np.arange(len(decisions)), lengths)
        first = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return first + np.arange(lengths.sum()), seg


def listwise_loss(scores: torch.Tensor, target: torch.Tensor, seg: torch.Tensor, n: int,
                  soft: torch.Tensor | None = None, soft_weight: float = 1.0,
                  weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Mean over decisions of -log P(evict one of the targets), P = softmax of -score over the decision's rows;
    plus, with `soft` (per-row target probabilities summing to 1 per decision), the cross-entropy against them.
    `weight` [n]: per-decision weights of the mean (regret weighting), None: equal."""
    logits = -scores
    peak = torch.full((n,), -torch.inf).scatter_reduce(0, seg, logits.detach(), "amax")
    shifted = torch.exp(logits - peak[seg])
    every = torch.zeros(n).index_add(0, seg, shifted)
    chosen = torch.zeros(n).index_add(0, seg, shifted * target)
    log_every = torch.log(every)
    per_decision = log_every - torch.log(chosen.clamp_min(1e-30))
    if soft is not None:
        log_p = logits - peak[seg] - log_every[seg]
        per_decision = per_decision - soft_weight * torch.zeros(n).index_add(0, seg, soft * log_p)
    if weight is None:
        return per_decision.mean()
    return (per_decision * weight).sum() / weight.sum().clamp_min(1e-12)


def regret_weights(distance: np.ndarray, seg: np.ndarray, n: int, horizon: float) -> np.ndarray:
    """Per decision, what a wrong choice costs: the mean over its candidates of 1 - log next-use distance over the
    farthest one's (capped at `horizon`); 0 where every candidate is as good as Belady's (nothing to learn), near 1
    where the farthest is far and the others are needed soon. Floored at 0.05 so no decision is dropped."""
    x = np.log1p(np.minimum(distance, horizon))
    peak = np.zeros(n)
    np.maximum.at(peak, seg, x)
    loss = 1.0 - x / np.maximum(peak[seg], 1e-12)
    total, count = np.zeros(n), np.zeros(n)
    np.add.at(total, seg, loss)
    np.add.at(count, seg, 1.0)
    return np.maximum(total / np.maximum(count, 1.0), 0.05)


def soft_targets(distance: np.ndarray, seg: np.ndarray, n: int, horizon: float, temperature: float) -> np.ndarray:
    """Per decision, a distribution over candidates rising with log next-use distance (capped at `horizon`):
    ranks every candidate, not only the farthest (Belady's order, softened)."""
    x = np.log1p(np.minimum(distance, horizon)) / temperature
    peak = np.full(n, -np.inf)
    np.maximum.at(peak, seg, x)
    e = np.exp(x - peak[seg])
    total = np.zeros(n)
    np.add.at(total, seg, e)
    return e / total[seg]


Progress = Callable[[int, float], None]  # (epoch, mean loss)


def fit_scorer(data: Decisions, hidden: int, epochs: int, lr: float, batch: int, seed: int,
               net: SetScorerNet | None = None, progress: Progress | None = None, soft_weight: float = 0.0,
               horizon: float = 1e4, temperature: float = 0.5,
               regret_weight: bool = False) -> SetScorerNet:  # fmt: skip
    """Train (or continue training) a scorer on `data`; the feature standardisation is fixed from `data`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if net is None:
        net = SetScorerNet(data.rows.shape[1], hidden)
    with torch.no_grad():
        net.mean.copy_(torch.from_numpy(data.rows.mean(axis=0)).float())
        std = data.rows.astype(np.float64).std(axis=0)
        net.std.copy_(torch.from_numpy(np.where(std < 1e-6, IGNORED_STD, np.maximum(std, 1e-3))).float())
    rows = torch.from_numpy(data.rows.astype(np.float32))
    target = torch.from_numpy(data.target.astype(np.float32))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for epoch in range(epochs):
        order = rng.permutation(data.size)
        total = 0.0
        for start in range(0, data.size, batch):
            chosen = order[start : start + batch]
            index, seg = data.select(chosen)
            soft = weight = None
            if soft_weight > 0 and data.distance is not None:
                soft = torch.from_numpy(soft_targets(data.distance[index], seg, len(chosen), horizon, temperature))
                soft = soft.float()
            if regret_weight and data.distance is not None:
                weight = torch.from_numpy(regret_weights(data.distance[index], seg, len(chosen), horizon)).float()
            loss = listwise_loss(net(rows[index]), target[index], torch.from_numpy(seg), len(chosen), soft, soft_weight,
                                 weight)  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(chosen)
        if progress is not None:
            progress(epoch, total / max(data.size, 1))
    return net.eval()


def agreement(scorer: NumpyScorer, data: Decisions) -> float:
    """Share of decisions where the scorer evicts one of the targets (Belady's choice)."""
    if not data.size:
        return float("nan")
    scores = scorer(data.rows.astype(np.float64))
    hits = 0
    for i in range(data.size):
        lo, hi = data.offsets[i], data.offsets[i + 1]
        hits += bool(data.target[lo + int(np.argmin(scores[lo:hi]))])
    return hits / data.size
