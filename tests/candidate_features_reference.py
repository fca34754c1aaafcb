"""The numpy CandidateFeatures as it was before its rules moved into agents/feature_kernel.py: its rules kept as
the reference that tests/test_feature_kernel.py holds the compiled rows to (every column, every event).

What the features are, their causality and their kinds of state: agents/candidate_features.py's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

# the columns, constants and tables are the library's (the same definitions); what is kept is the old rules below
from moe_env.agents.candidate_features import (
    _LOG_SCALE,
    FAST,
    FEATURES,
    GAP_COLUMNS,
    HIDEABLE,
    HISTORY_COLUMNS,
    LONG,
    NEVER,
    NUM_FEATURES,
    REPEAT,
    REPEAT_COLUMNS,
    SLOW,
    SMOOTHING,
    VLONG,
    WINDOW,
    ModelTables,
    event_token,
)

from moe_env.policy import CacheView, ModelSpec, RouteEvent


class CandidateFeatures:
    """Online per-(layer, expert) state; ``rows(layer, candidates, cache)`` is the scorer's input [C, F]."""

    def __init__(self, spec: ModelSpec, capacity: int, tables: ModelTables | None = None,
                 columns: Collection[str] | None = None):  # fmt: skip
        """`columns`: the columns the caller reads (None: all); HISTORY_COLUMNS and REPEAT_COLUMNS are zero in
        the rows unless one of them is read (a checkpoint trained before them pays nothing for them)."""
        num_layers, num_experts = spec.num_layers, spec.num_experts
        self._history = columns is None or bool(set(columns) & set(HISTORY_COLUMNS))
        self._repeats = columns is None or bool(set(columns) & set(REPEAT_COLUMNS))
        self.spec = spec
        self.capacity = capacity
        shape = (num_layers, num_experts)
        if tables is not None and tables.shape != (num_layers, num_experts, spec.top_k):
            tables = None
        self.popularity = np.zeros(shape) if tables is None else tables.popularity.astype(np.float64)
        self.transition = np.zeros((*shape, num_experts)) if tables is None else tables.transition.astype(np.float64)
        self.coactivation = (
            np.zeros((*shape, num_experts)) if tables is None else tables.coactivation.astype(np.float64)
        )
        self.token_counts: dict[int, np.ndarray] = {}
        self.next_counts: dict[int, np.ndarray] = {}
        if tables is not None:
            for key, counts in zip(tables.token_keys.tolist(), tables.token_counts, strict=True):
                self.token_counts[int(key)] = counts.astype(np.float64)
            if tables.next_counts is not None:
                for key, counts in zip(tables.token_keys.tolist(), tables.next_counts, strict=True):
                    self.next_counts[int(key)] = counts.astype(np.float64)
        self._uniform = spec.top_k / num_experts
        static = np.zeros(NUM_FEATURES)
        static[FEATURES.index("budget")] = capacity / num_experts
        static[FEATURES.index("top_k_per_slot")] = spec.top_k / capacity
        self._static = static
        self._layer_position = np.arange(num_layers) / max(num_layers - 1, 1)
        self._col = {name: i for i, name in enumerate(FEATURES)}
        self.begin_sequence()

    def begin_sequence(self, hidden: Collection[str] = ()) -> None:
        """A new sequence; `hidden` signals (HIDEABLE) are ignored in it, as if the trace lacked them."""
        unknown = set(hidden) - set(HIDEABLE)
        if unknown:
            raise ValueError(f"cannot hide {sorted(unknown)}: hideable signals are {HIDEABLE}")
        self.hidden = frozenset(hidden)
        num_layers, num_experts = self.spec.num_layers, self.spec.num_experts
        shape = (num_layers, num_experts)
        self.step = 0
        self.clock = 0
        self._version = 0
        self._cached_layer, self._cached_version, self._cached_rows = -1, -1, np.zeros(0)
        self.token: int | None = None
        self.previous_input: int | None = None  # the input token of the step before
        self.token_step = -1
        self.step_tokens: dict[int, int | None] = {}  # decode step -> its input token, this sequence
        self.token_last: dict[int, int] = {}  # token -> the latest decode step it was the input of
        self.repeat_from: int | None = None  # the latest earlier step with the current input token
        self.routed: dict[tuple[int, int], tuple[int, ...]] = {}  # (layer, decode step) -> experts, this sequence
        self.last_step = np.full(shape, -(10**6), dtype=np.int64)
        self.count = np.zeros(shape)
        self.fast = np.zeros(shape)
        self.slow = np.zeros(shape)
        self.long = np.zeros(shape)
        self.vlong = np.zeros(shape)
        # the steps of its last len(GAP_COLUMNS) + 1 uses, newest first (NEVER where fewer)
        self.use_steps = np.full((*shape, len(GAP_COLUMNS) + 1), NEVER, dtype=np.int64)
        self.decay_step = np.zeros(num_layers, dtype=np.int64)
        self.history = np.zeros((num_layers, WINDOW, num_experts), dtype=bool)
        self.history_step = np.full((num_layers, WINDOW), -(10**6), dtype=np.int64)
        self.tokens_seen = np.zeros(num_layers)
        self.last_weight = np.zeros(shape)
        self.has_weight = False
        self.current: list[tuple[int, ...]] = [()] * num_layers  # latest decode experts of each layer
        self.current_step = np.full(num_layers, -(10**6), dtype=np.int64)
        self.previous = np.zeros(shape, dtype=bool)  # experts of the step before the layer's latest
        self.gate = np.zeros(shape)
        self.has_gate = np.zeros(num_layers, dtype=bool)
        self.lookahead = np.zeros(shape)  # for layer l, from layer l-1's event of step lookahead_step[l]
        self.lookahead_step = np.full(num_layers, -(10**6), dtype=np.int64)

    # -- state -----------------------------------------------------------------------------------------------
    def update(self, event: RouteEvent, clock: int = 0) -> None:
        """Account one routed event (before the cache serves it: its experts are known, its successors are not);
        `clock` is the cache's clock as the event starts."""
        self._version += 1
        self.clock = clock
        layer = event.layer
        experts = list(event.experts)
        step = max(event.step, 0)
        self.step = step
        hidden = self.hidden
        token = None if "tokens" in hidden else event_token(event)
        weights = None if "gate weights" in hidden else event.weights
        gate_logits = None if "gate logits" in hidden else event.gate_logits
        lookahead_logits = None if "lookahead" in hidden else event.lookahead_logits
        if not event.prefill and step != self.token_step:
            self.previous_input = self.token if self.token_step == step - 1 else None
            self.token_step = step
            self.token = token
            self.repeat_from = None if token is None else self.token_last.get(token)
            if token is not None:
                self.token_last[token] = step
            self.step_tokens[step] = token
        elif token is not None:
            self.token = token
        behind = step - int(self.decay_step[layer])
        if behind > 0:
            self.fast[layer] *= FAST**behind
            self.slow[layer] *= SLOW**behind
            self.long[layer] *= LONG**behind
            self.vlong[layer] *= VLONG**behind
            self.decay_step[layer] = step
        self.fast[layer, experts] += 1.0
        self.slow[layer, experts] += 1.0
        self.long[layer, experts] += 1.0
        self.vlong[layer, experts] += 1.0
        fresh = [e for e in experts if self.use_steps[layer, e, 0] != step]  # one use per step (prefill repeats)
        if fresh:
            history = self.use_steps[layer, fresh]
            history[:, 1:] = history[:, :-1].copy()
            history[:, 0] = step
            self.use_steps[layer, fresh] = history
        self.count[layer, experts] += 1.0
        self.last_step[layer, experts] = step
        if weights is not None:
            self.has_weight = True
            self.last_weight[layer, experts] = np.asarray(weights, dtype=np.float64)[: len(experts)]
        if event.prefill:
            self.popularity[layer, experts] += 1.0
            return
        self.tokens_seen[layer] += 1
        self.routed[(layer, step)] = tuple(experts)
        self.popularity[layer, experts] += 1.0
        slot = step % WINDOW
        self.history[layer, slot] = False
        self.history[layer, slot, experts] = True
        self.history_step[layer, slot] = step
        before = self.current[layer]
        if before and self.current_step[layer] == step - 1:
            self.transition[layer, np.asarray(before)[:, None], np.asarray(experts)[None, :]] += 1.0
        self.previous[layer] = False
        if before:
            self.previous[layer, list(before)] = True
        self.current[layer] = tuple(experts)
        self.current_step[layer] = step
        if layer > 0 and self.current_step[layer - 1] == step and self.current[layer - 1]:
            self.coactivation[layer, np.asarray(self.current[layer - 1])[:, None], np.asarray(experts)[None, :]] += 1
        shape = (self.spec.num_layers, self.spec.num_experts)
        if self.token is not None:
            counts = self.token_counts.get(self.token)
            if counts is None:
                counts = self.token_counts[self.token] = np.zeros(shape)
            counts[layer, experts] += 1.0
        if self.previous_input is not None:
            counts = self.next_counts.get(self.previous_input)
            if counts is None:
                counts = self.next_counts[self.previous_input] = np.zeros(shape)
            counts[layer, experts] += 1.0
        self.has_gate[layer] = gate_logits is not None
        if gate_logits is not None:
            self.gate[layer] = _softmax(gate_logits)
        if lookahead_logits is not None and layer + 1 < self.spec.num_layers:
            self.lookahead[layer + 1] = _softmax(lookahead_logits)
            self.lookahead_step[layer + 1] = step

    # -- features --------------------------------------------------------------------------------------------
    def _conditional(self, table: np.ndarray, given: tuple[int, ...], layer: int, prior: np.ndarray) -> np.ndarray:
        """log of mean_j P(e | j) / uniform for every expert e, each P smoothed toward the layer's long-run share."""
        if not given:
            return np.zeros(len(prior))
        rows = table[layer][list(given)]  # [g, E]
        totals = rows.sum(axis=1, keepdims=True) / self.spec.top_k
        p = (rows + SMOOTHING * prior[None, :]) / (totals + SMOOTHING)
        return np.log(p.mean(axis=0) / self._uniform)

    def _mixture(self, table: np.ndarray, weight: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """log of sum_j w_j P(e | j) / sum_j w_j / uniform: the conditional of the layer's recent experts (weights
        `weight`), each P smoothed toward the layer's long-run share; 0 before any use."""
        total = weight.sum()
        if total <= 0:
            return np.zeros(len(prior))
        totals = table.sum(axis=1, keepdims=True) / self.spec.top_k
        p = (table + SMOOTHING * prior[None, :]) / (totals + SMOOTHING)
        return np.log((weight / total) @ p / self._uniform)

    def rows(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        """Features [len(candidates), NUM_FEATURES] of `candidates` (experts of `layer`) at the current step."""
        return self.layer_rows(layer, cache)[candidates]

    def layer_rows(self, layer: int, cache: CacheView) -> np.ndarray:
        """Features [E, NUM_FEATURES] of every expert of `layer`, computed once per update (an event's evictions
        share them: within an event nothing a feature reads changes)."""
        if self._cached_layer == layer and self._cached_version == self._version:
            return self._cached_rows
        c = self._col
        num_experts = self.spec.num_experts
        out = np.empty((num_experts, NUM_FEATURES))
        out[:] = self._static
        slots = cache.layer_capacity(layer) if hasattr(cache, "layer_capacity") else self.capacity
        if slots != self.capacity:  # a per-layer allocation: this layer's own budget
            out[:, c["budget"]] = slots / num_experts
            out[:, c["top_k_per_slot"]] = self.spec.top_k / max(slots, 1)
        step = self.step
        age = step - self.last_step[layer]
        out[:, c["recency"]] = np.minimum(np.log1p(np.maximum(age, 0)) * _LOG_SCALE, 1.0)
        count = self.count[layer]
        out[:, c["seq_count"]] = np.log1p(count) * _LOG_SCALE
        behind = max(step - int(self.decay_step[layer]), 0)
        out[:, c["decay_fast"]] = self.fast[layer] * FAST**behind
        out[:, c["decay_slow"]] = self.slow[layer] * (SLOW**behind * (1 - SLOW))
        out[:, c["decay_long"]] = self.long[layer] * (LONG**behind * (1 - LONG))
        out[:, c["decay_vlong"]] = self.vlong[layer] * (VLONG**behind * (1 - VLONG))
        if self._history:
            self._gap_columns(layer, out, age)
        if self._repeats:
            self._repeat_columns(layer, out)
        out[:, c["seq_tokens"]] = math.log1p(self.tokens_seen[layer]) * _LOG_SCALE
        recent = self.history_step[layer] > step - WINDOW
        out[:, c["window"]] = self.history[layer][recent].sum(axis=0) / WINDOW
        out[:, c["seq_share"]] = count / (self.tokens_seen[layer] + 1.0) / self._uniform
        popularity = self.popularity[layer]
        share = (popularity + 1.0) / (popularity.sum() + num_experts)
        out[:, c["long_share"]] = share * num_experts
        prior = share * self.spec.top_k
        out[:, c["transition"]] = self._conditional(self.transition, self.current[layer], layer, prior)
        out[:, c["transition_mix"]] = self._mixture(self.transition[layer], self.slow[layer], prior)
        first = not (layer > 0 and self.current_step[layer - 1] == step)  # layer l-1 has routed this token
        out[:, c["coactivation"]] = (
            0.0 if first else self._conditional(self.coactivation, self.current[layer - 1], layer, prior)
        )
        out[:, c["first_layer"]] = float(first)
        counts = None if self.token is None else self.token_counts.get(self.token)
        if counts is not None and counts[layer].sum() > 0:
            row = counts[layer]
            p = (row + SMOOTHING * prior) / (row.sum() / self.spec.top_k + SMOOTHING)
            out[:, c["token"]] = np.log(p / self._uniform)
            out[:, c["token_missing"]] = 0.0
        else:
            out[:, c["token"]] = 0.0
            out[:, c["token_missing"]] = 1.0
        after = None if self.token is None else self.next_counts.get(self.token)
        if after is not None and after[layer].sum() > 0:
            row = after[layer]
            p = (row + SMOOTHING * prior) / (row.sum() / self.spec.top_k + SMOOTHING)
            out[:, c["token_next"]] = np.log(p / self._uniform)
        else:
            out[:, c["token_next"]] = 0.0
        gate = bool(self.has_gate[layer])
        out[:, c["gate_prob"]] = self.gate[layer] if gate else 0.0
        out[:, c["gate_missing"]] = 0.0 if gate else 1.0
        lookahead = self.lookahead_step[layer] == step
        out[:, c["lookahead_prob"]] = self.lookahead[layer] if lookahead else 0.0
        out[:, c["lookahead_missing"]] = 0.0 if lookahead else 1.0
        out[:, c["last_weight"]] = self.last_weight[layer]
        out[:, c["weight_missing"]] = 0.0 if self.has_weight else 1.0
        out[:, c["previous_token"]] = self.previous[layer]
        # loaded_at is fixed for every candidate during an event; the clock is the event's start
        loaded = cache.loaded_at(layer)
        accesses_per_token = self.spec.num_layers * self.spec.top_k
        out[:, c["resident_age"]] = np.minimum(
            np.log1p(np.maximum(self.clock - loaded, 0) / accesses_per_token) * _LOG_SCALE, 1.0
        )
        out[:, c["layer_position"]] = self._layer_position[layer]
        self._cached_layer, self._cached_version, self._cached_rows = layer, self._version, out
        return out

    def _gap_columns(self, layer: int, out: np.ndarray, age: np.ndarray) -> None:
        """gap_1..gap_K, gap_mean and overdue of every expert of `layer` into `out`."""
        c = self._col
        uses = self.use_steps[layer]  # [E, K + 1] newest first
        known = uses[:, 1:] > NEVER  # gap i exists when use i + 1 happened
        gaps = np.where(known, uses[:, :-1] - uses[:, 1:], 0)
        logged = np.where(known, np.minimum(np.log1p(gaps) * _LOG_SCALE, 1.0), 1.0)
        for i, name in enumerate(GAP_COLUMNS):
            out[:, c[name]] = logged[:, i]
        n = known.sum(axis=1)
        mean = np.where(n > 0, gaps.sum(axis=1) / np.maximum(n, 1), 0.0)
        out[:, c["gap_mean"]] = np.where(n > 0, np.minimum(np.log1p(mean) * _LOG_SCALE, 1.0), 1.0)
        ratio = np.log((np.maximum(age, 0) + 1.0) / (mean + 1.0)) * _LOG_SCALE
        out[:, c["overdue"]] = np.where(n > 0, np.clip(ratio, -1.0, 1.0), 0.0)

    def _repeat_columns(self, layer: int, out: np.ndarray) -> None:
        """repeat_next, repeat_soon, repeat_bigram and repeat_missing of every expert of `layer` into `out`."""
        c = self._col
        start, step = self.repeat_from, self.step
        out[:, c["repeat_next"]] = 0.0
        out[:, c["repeat_soon"]] = 0.0
        out[:, c["repeat_missing"]] = float(start is None)
        out[:, c["repeat_bigram"]] = 0.0
        if start is None:
            return
        before = self.step_tokens.get(start - 1)
        out[:, c["repeat_bigram"]] = float(before is not None and before == self.step_tokens.get(step - 1))
        for k in range(1, REPEAT + 1):
            if start + k > step:
                break
            experts = list(self.routed.get((layer, start + k), ()))
            if k == 1:
                out[experts, c["repeat_next"]] = 1.0
            out[experts, c["repeat_soon"]] += 0.5 ** (k - 1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        return np.zeros_like(x)
    x = np.exp(x - x.max())
    return x / x.sum()
