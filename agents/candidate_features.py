"""Per-candidate features of the shape-agnostic set scorer: one row per (layer, expert), the same columns for
every model, so one network scores candidates of any (layers, experts, top-k) with weights shared across experts
and layers (as Parrot and LRB score cache lines).

``CandidateFeatures`` is fed every RouteEvent (``update``) in route order and asked for the rows of some
candidates of one layer (``rows``): all candidates of an eviction in one vectorised numpy call. Causality: at
decode step t it knows the routing of steps <= t up to the current layer and token t (the input of step t, when
the trace has tokens); never the future. Three kinds of state:

- per sequence (reset by ``begin_sequence``): recency, counts, decayed and windowed counts, last gate weight,
  the current and previous experts of each layer, gate and lookahead probabilities of the current step;
- online statistics of the deployment, kept across sequences (learned while serving, never reset for the same
  model): long-run share, same-layer transitions P(e at t+1 | experts at t), inter-layer co-activation
  P(e at l | experts at l-1, same token), and a token -> expert table;
- an optional prior (``ModelTables``, learned from a training split of the same model) that warm-starts those
  online statistics; without it they start empty.

Signals a trace may lack (gate weights, gate logits, lookahead logits, tokens) are zero with a "missing"
indicator column, so a checkpoint trained where they exist still runs where they do not. ``begin_sequence(hidden=
...)`` hides signals (names in HIDEABLE) for one sequence as if the trace lacked them: training with such
signal dropout shows the scorer both states, so one checkpoint is good with and without them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from moe_env.agents.feature_kernel import (
    CLOCK,
    CURRENT_N,
    CURRENT_STEP,
    HAS_WEIGHT,
    LOOKAHEAD_STEP,
    NUM_PER_LAYER,
    NUM_SCALARS,
    NUM_VALUES,
    PREVIOUS_INPUT,
    REPEAT_FROM,
    ROUTED_STEPS,
    STEP,
    TOKEN_ROW,
    TOKEN_STEP,
    FeatureState,
    candidate_rows,
    update,
)

from moe_env.policy import CacheView, ModelSpec, RouteEvent

FEATURES: tuple[str, ...] = (
    "recency",  # log tokens since last use (1 = never / very long ago)
    "seq_count",  # log uses this sequence
    "decay_fast",  # uses decayed by 0.5 per token
    "decay_slow",  # uses decayed by 0.9 per token, scaled by 0.1
    "window",  # share of the last WINDOW tokens that used it
    "seq_share",  # uses / tokens this sequence, 1 = uniform
    "long_share",  # deployment-wide share of this layer's uses, 1 = uniform
    "transition",  # log odds-ratio of P(e at t+1 | experts of this layer at t) against uniform
    "coactivation",  # same for P(e at l | experts of layer l-1 at this token)
    "token",  # same for P(e at l | token t)
    "token_missing",
    "token_next",  # same for P(e at l at step t+1 | token t): the input token says what the next one routes to
    "gate_prob",  # the router's probability at this layer's latest step
    "gate_missing",
    "lookahead_prob",  # probability from the previous layer's lookahead logits at this step
    "lookahead_missing",
    "last_weight",  # gate weight at its last use
    "weight_missing",
    "previous_token",  # used by this layer at the previous token
    "resident_age",  # log tokens since it was loaded
    "layer_position",  # l / (L - 1)
    "first_layer",  # no previous layer: co-activation is unavailable
    "budget",  # capacity / E
    "top_k_per_slot",  # k / capacity
    # added after the first shipped checkpoints (a checkpoint trained on a prefix of these loads: see set_scorer)
    "seq_tokens",  # log tokens seen this sequence at this layer: how much evidence seq_share / seq_count carry
    "decay_long",  # uses decayed by 0.98 per token, scaled by 0.02: a ~50-token window, between slow and seq
    "transition_mix",  # log odds-ratio of the mixture of P(e at t+1 | j) over j, weighted by j's decay_slow
    # reuse history (LRB-style): the last GAPS inter-arrival gaps of this (layer, expert), in tokens
    "gap_1",  # log gap between its last two uses (1 = fewer than two uses this sequence)
    "gap_2",  # the gap before that
    "gap_3",
    "gap_4",
    "gap_mean",  # log mean of its known gaps (1 = none)
    "overdue",  # log (tokens since last use + 1) / (mean gap + 1), scaled: > 0 = later than its habit (0 = no gap)
    "decay_vlong",  # uses decayed by 0.995 per token, scaled by 0.005: a ~200-token window
    # repeats (an induction-head guess): text repeats, and so does its routing. s = the latest earlier step of this
    # sequence whose input token equals the current one; the tokens after s are a guess at the tokens after t
    "repeat_next",  # used by this layer at step s + 1
    "repeat_soon",  # sum over k = 1..REPEAT of 0.5^(k-1) [used by this layer at step s + k], s + k <= t
    "repeat_bigram",  # the tokens before s and before t match too (a longer match: a likelier repeat)
    "repeat_missing",  # the current token has no earlier occurrence in this sequence (or the trace has no tokens)
)
NUM_FEATURES = len(FEATURES)
# columns added for the eviction scorer after the prefetch predictor's were fixed (agents/set_predictor.py leaves
# them out, so its checkpoints keep their width)
EVICTION_COLUMNS: tuple[str, ...] = (
    "seq_tokens", "decay_long", "transition_mix", "gap_1", "gap_2", "gap_3", "gap_4", "gap_mean", "overdue",
    "decay_vlong", "repeat_next", "repeat_soon", "repeat_bigram", "repeat_missing",
)
GAP_COLUMNS: tuple[str, ...] = ("gap_1", "gap_2", "gap_3", "gap_4")
# columns computed only for a caller that reads them (the rest of the row costs little): zero otherwise
HISTORY_COLUMNS: tuple[str, ...] = (*GAP_COLUMNS, "gap_mean", "overdue")
REPEAT_COLUMNS: tuple[str, ...] = ("repeat_next", "repeat_soon", "repeat_bigram", "repeat_missing")
HIDEABLE: tuple[str, ...] = ("tokens", "gate weights", "gate logits", "lookahead")
WINDOW = 8
REPEAT = 4  # steps after the earlier occurrence that repeat_soon looks at
FAST, SLOW, LONG, VLONG = 0.5, 0.9, 0.98, 0.995
NEVER = -(10**6)  # the step of a use that never happened
SMOOTHING = 2.0  # virtual observations (at the layer's long-run share) behind each conditional estimate
_LOG_SCALE = 1.0 / math.log(257.0)


def token_key(token: int | str | None) -> int | None:
    """The key of a token in the token tables: an int token id as is, a string by a stable hash."""
    if token is None:
        return None
    if isinstance(token, str):
        return zlib.crc32(token.encode("utf-8")) & 0x7FFFFFFF
    value = int(token)
    return value if value >= 0 else None


def event_token(event: RouteEvent) -> int | None:
    """The input token of the event's forward pass, when the driver knows it (``event.extra['token']``)."""
    return token_key(event.extra.get("token")) if event.extra else None


@dataclass
class ModelTables:
    """Prior statistics of one model, learned from a training split: counts that warm-start the online ones."""

    num_layers: int
    num_experts: int
    top_k: int
    popularity: np.ndarray  # [L, E] uses
    transition: np.ndarray  # [L, E, E] (e at t, e' at t+1) counts, same layer
    coactivation: np.ndarray  # [L, E, E] (e at l-1, e' at l) counts, same token
    token_keys: np.ndarray  # [V] int64
    token_counts: np.ndarray  # [V, L, E] uses by the tokens' own forward passes
    next_counts: np.ndarray | None = None  # [V, L, E] uses by the forward pass AFTER each token's

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.num_experts, self.top_k)


class CandidateFeatures:
    """Online per-(layer, expert) state; ``rows(layer, candidates, cache)`` is the scorer's input [C, F].

    The state lives in the arrays of ``state`` (agents/feature_kernel.FeatureState) and the rules in that module's
    compiled ``update`` and ``candidate_rows``, which agents/scored_replay.py calls too; this class maps tokens to
    table rows, grows the arrays and reads the cache view."""

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
        self._token_row: dict[int, int] = {}  # token key -> row of the token tables
        self._token_keys: list[int] = []
        token_counts = np.zeros((0, *shape))
        next_counts = np.zeros((0, *shape))
        if tables is not None:
            for key in tables.token_keys.tolist():
                self._token_row.setdefault(int(key), len(self._token_keys))
                if len(self._token_row) > len(self._token_keys):
                    self._token_keys.append(int(key))
            token_counts = np.zeros((len(self._token_keys), *shape))
            next_counts = np.zeros((len(self._token_keys), *shape))
            rows = [self._token_row[int(key)] for key in tables.token_keys.tolist()]
            token_counts[rows] = tables.token_counts.astype(np.float64)  # a repeated key: its last entry, as a dict
            if tables.next_counts is not None:
                next_counts[rows] = tables.next_counts.astype(np.float64)
        self.state = FeatureState(
            values=np.zeros((NUM_VALUES, *shape)),
            last_step=np.zeros(shape, dtype=np.int64),
            use_steps=np.zeros((*shape, len(GAP_COLUMNS) + 1), dtype=np.int64),
            per_layer=np.zeros((NUM_PER_LAYER, num_layers), dtype=np.int64),
            current=np.zeros(shape, dtype=np.int64),
            history=np.zeros((num_layers, WINDOW, num_experts), dtype=bool),
            history_step=np.zeros((num_layers, WINDOW), dtype=np.int64),
            tokens_seen=np.zeros(num_layers),
            scalars=np.zeros(NUM_SCALARS, dtype=np.int64),
            step_tokens=np.full(64, -1, dtype=np.int64),
            token_last=np.full(len(self._token_keys), -1, dtype=np.int64),
            routed=np.zeros((64, *shape), dtype=np.uint8),
            hidden=np.zeros(len(HIDEABLE), dtype=bool),
            popularity=np.zeros(shape) if tables is None else tables.popularity.astype(np.float64),
            transition=np.zeros((*shape, num_experts)) if tables is None else tables.transition.astype(np.float64),
            coactivation=np.zeros((*shape, num_experts)) if tables is None else tables.coactivation.astype(np.float64),
            token_counts=token_counts,
            next_counts=next_counts,
        )
        self._arrays = self.state.arrays()
        self._no_weights = np.zeros(0)
        self._all = np.arange(num_experts, dtype=np.int64)
        self.begin_sequence()

    # -- the state, as the features' former attributes ---------------------------------------------------------
    @property
    def popularity(self) -> np.ndarray:
        return self.state.popularity

    @property
    def transition(self) -> np.ndarray:
        return self.state.transition

    @property
    def coactivation(self) -> np.ndarray:
        return self.state.coactivation

    @property
    def step(self) -> int:
        return int(self.state.scalars[STEP])

    @property
    def clock(self) -> int:
        return int(self.state.scalars[CLOCK])

    @property
    def token(self) -> int | None:
        """The current input token's key (None: unknown)."""
        row = int(self.state.scalars[TOKEN_ROW])
        return None if row < 0 else self._token_keys[row]

    @property
    def has_weight(self) -> bool:
        return bool(self.state.scalars[HAS_WEIGHT])

    @property
    def current_step(self) -> np.ndarray:
        """The decode step each layer routed last."""
        return self.state.per_layer[CURRENT_STEP]

    @property
    def current(self) -> _LatestExperts:
        """current[layer]: the experts of the layer's latest decode event, a tuple (empty before one)."""
        return _LatestExperts(self.state)

    def token_row(self, key: int) -> int:
        """The row of token `key` in the token tables, added (zeros: never seen) if new."""
        row = self._token_row.get(key)
        if row is None:
            row = self._token_row[key] = len(self._token_keys)
            self._token_keys.append(key)
            state = self.state
            if row >= len(state.token_counts):
                grown = max(16, 2 * len(state.token_counts))
                state.token_counts = _grow(state.token_counts, grown, 0.0)
                state.next_counts = _grow(state.next_counts, grown, 0.0)
                state.token_last = _grow(state.token_last, grown, -1)
                self._arrays = state.arrays()
        return row

    def reserve_steps(self, steps: int) -> None:
        """Room for decode steps 0..steps-1 in the per-sequence step arrays."""
        state = self.state
        if steps > len(state.step_tokens):
            grown = max(steps, 2 * len(state.step_tokens))
            state.step_tokens = _grow(state.step_tokens, grown, -1)
            state.routed = _grow(state.routed, grown, 0)
            self._arrays = state.arrays()

    def changed(self) -> None:
        """The state was updated outside ``update`` (a compiled replay): rows cached before are stale."""
        self._version += 1

    def arrays(self) -> tuple:
        """The state arrays as the compiled functions take them (valid until the next token row or step grows)."""
        return self._arrays

    def begin_sequence(self, hidden: Collection[str] = ()) -> None:
        """A new sequence; `hidden` signals (HIDEABLE) are ignored in it, as if the trace lacked them."""
        unknown = set(hidden) - set(HIDEABLE)
        if unknown:
            raise ValueError(f"cannot hide {sorted(unknown)}: hideable signals are {HIDEABLE}")
        self.hidden = frozenset(hidden)
        state = self.state
        state.hidden[:] = [name in self.hidden for name in HIDEABLE]
        self._version = 0
        self._cached_layer, self._cached_version, self._cached_rows = -1, -1, np.zeros(0)
        state.values[:] = 0.0
        state.last_step[:] = NEVER
        state.use_steps[:] = NEVER  # the steps of its last len(GAP_COLUMNS) + 1 uses, newest first
        state.per_layer[:] = 0
        state.per_layer[[CURRENT_STEP, LOOKAHEAD_STEP]] = NEVER
        state.current[:] = 0
        state.history[:] = False
        state.history_step[:] = NEVER
        state.tokens_seen[:] = 0.0
        used = int(state.scalars[ROUTED_STEPS])
        state.routed[:used] = 0
        state.step_tokens[:] = -1
        state.token_last[:] = -1
        state.scalars[:] = 0
        state.scalars[[TOKEN_ROW, PREVIOUS_INPUT, TOKEN_STEP, REPEAT_FROM]] = -1

    # -- state -----------------------------------------------------------------------------------------------
    def update(self, event: RouteEvent, clock: int = 0) -> None:
        """Account one routed event (before the cache serves it: its experts are known, its successors are not);
        `clock` is the cache's clock as the event starts."""
        self._version += 1
        key = event_token(event)
        token = -1 if key is None else self.token_row(key)
        step = max(event.step, 0)
        if not event.prefill:
            self.reserve_steps(step + 1)
        weights, gate, lookahead = event.weights, event.gate_logits, event.lookahead_logits
        none = self._no_weights
        update(self._arrays, event.layer, np.asarray(event.experts, dtype=np.int64), event.step, event.prefill,
               token, none if weights is None else np.asarray(weights, dtype=np.float64), weights is not None,
               none if gate is None else np.asarray(gate, dtype=np.float64).reshape(-1), gate is not None,
               none if lookahead is None else np.asarray(lookahead, dtype=np.float64).reshape(-1),
               lookahead is not None, clock)  # fmt: skip

    # -- features --------------------------------------------------------------------------------------------
    def rows(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        """Features [len(candidates), NUM_FEATURES] of `candidates` (experts of `layer`) at the current step."""
        return self.layer_rows(layer, cache)[candidates]

    def layer_rows(self, layer: int, cache: CacheView) -> np.ndarray:
        """Features [E, NUM_FEATURES] of every expert of `layer`, computed once per update (an event's evictions
        share them: within an event nothing a feature reads changes)."""
        if self._cached_layer == layer and self._cached_version == self._version:
            return self._cached_rows
        num_experts = self.spec.num_experts
        out = np.empty((num_experts, NUM_FEATURES))
        slots = cache.layer_capacity(layer) if hasattr(cache, "layer_capacity") else self.capacity
        loaded = np.asarray(cache.loaded_at(layer), dtype=np.int64)
        candidate_rows(self._arrays, layer, self._all, num_experts, slots, self.capacity, self.spec.top_k, loaded,
                       self._history, self._repeats, out)  # fmt: skip
        self._cached_layer, self._cached_version, self._cached_rows = layer, self._version, out
        return out


class _LatestExperts:
    """``features.current[layer]``: the experts of the layer's latest decode event as a tuple."""

    def __init__(self, state: FeatureState):
        self._state = state

    def __getitem__(self, layer: int) -> tuple[int, ...]:
        n = int(self._state.per_layer[CURRENT_N, layer])
        return tuple(self._state.current[layer, :n].tolist())


def _grow(array: np.ndarray, rows: int, fill: float) -> np.ndarray:
    grown = np.full((rows, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
