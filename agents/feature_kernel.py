"""The compiled core of agents/candidate_features.py: its per-event update and its per-candidate rows (numba).

CandidateFeatures keeps its state in the arrays of ``FeatureState`` and calls ``update`` and ``candidate_rows``
here for every event and every decision; agents/scored_replay.py calls the same two functions from its compiled
replay loop. So the features have ONE implementation, whichever path drives them.

Token-keyed tables are arrays indexed by a token *row* (CandidateFeatures maps token keys to rows, adding rows as
new tokens appear): a row of zeros is a token never seen, as a missing dict entry was. Steps index the
per-sequence arrays (the input token of each step, the experts each layer routed at each step), grown by the
caller before a step past their end is updated.

A value equals the former numpy code's to the last bit or within a few ulps: numba's exp/log/pow are libm's
while numpy's may be its own SIMD ones, and a dot product sums in its own order (tests/test_feature_kernel.py
holds the former code as its reference, at 1e-12).

numba's on-disk cache is keyed by the defining file: after editing cache_kernel._pairwise_sum or this file's
functions, the cached agents/scored_replay.py still embeds the old ones (delete its ``__pycache__`` entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from moe_env.cache_kernel import _pairwise_sum

# columns, in agents/candidate_features.FEATURES order (checked there at import)
(RECENCY, SEQ_COUNT, DECAY_FAST, DECAY_SLOW, WINDOW_COL, SEQ_SHARE, LONG_SHARE, TRANSITION, COACTIVATION, TOKEN,
 TOKEN_MISSING, TOKEN_NEXT, GATE_PROB, GATE_MISSING, LOOKAHEAD_PROB, LOOKAHEAD_MISSING, LAST_WEIGHT, WEIGHT_MISSING,
 PREVIOUS_TOKEN, RESIDENT_AGE, LAYER_POSITION, FIRST_LAYER, BUDGET, TOP_K_PER_SLOT, SEQ_TOKENS, DECAY_LONG,
 TRANSITION_MIX, GAP_1, GAP_2, GAP_3, GAP_4, GAP_MEAN, OVERDUE, DECAY_VLONG, REPEAT_NEXT, REPEAT_SOON, REPEAT_BIGRAM,
 REPEAT_MISSING) = range(38)  # fmt: skip
NUM_COLUMNS = 38
WINDOW = 8
REPEAT = 4
GAPS = 4
FAST, SLOW, LONG, VLONG = 0.5, 0.9, 0.98, 0.995
NEVER = -(10**6)
SMOOTHING = 2.0
LOG_SCALE = 1.0 / math.log(257.0)

# planes of FeatureState.values [NV, L, E]
COUNT, FAST_SUM, SLOW_SUM, LONG_SUM, VLONG_SUM, WEIGHT, GATE, LOOKAHEAD, PREVIOUS = range(9)
NUM_VALUES = 9
# rows of FeatureState.per_layer [NP, L]
DECAY_STEP, CURRENT_STEP, LOOKAHEAD_STEP, HAS_GATE, CURRENT_N = range(5)
NUM_PER_LAYER = 5
# FeatureState.scalars
STEP, CLOCK, TOKEN_ROW, PREVIOUS_INPUT, TOKEN_STEP, REPEAT_FROM, HAS_WEIGHT, ROUTED_STEPS = range(8)
NUM_SCALARS = 8
# FeatureState.hidden flags
HIDE_TOKENS, HIDE_WEIGHTS, HIDE_GATE, HIDE_LOOKAHEAD = range(4)


@dataclass
class FeatureState:
    """Every array the compiled update reads or writes. Per sequence: values, last_step, use_steps, per_layer,
    current (the latest decode experts of each layer, CURRENT_N of them), history/history_step (the WINDOW
    ring), tokens_seen, scalars, step_tokens (step -> token row, -1 none), token_last (token row -> latest step,
    -1 none), routed (step, layer, expert) and hidden. Kept across sequences (the deployment's online
    statistics): popularity, transition, coactivation, token_counts, next_counts."""

    values: np.ndarray
    last_step: np.ndarray
    use_steps: np.ndarray
    per_layer: np.ndarray
    current: np.ndarray
    history: np.ndarray
    history_step: np.ndarray
    tokens_seen: np.ndarray
    scalars: np.ndarray
    step_tokens: np.ndarray
    token_last: np.ndarray
    routed: np.ndarray
    hidden: np.ndarray
    popularity: np.ndarray
    transition: np.ndarray
    coactivation: np.ndarray
    token_counts: np.ndarray
    next_counts: np.ndarray

    def arrays(self) -> tuple:
        """The arrays in the order the compiled functions take them."""
        return (self.values, self.last_step, self.use_steps, self.per_layer, self.current, self.history,
                self.history_step, self.tokens_seen, self.scalars, self.step_tokens, self.token_last, self.routed,
                self.hidden, self.popularity, self.transition, self.coactivation, self.token_counts,
                self.next_counts)  # fmt: skip


@numba.njit(cache=True, error_model="numpy")
def softmax_into(logits, out):  # pragma: no cover - compiled
    """out = softmax(logits) in float64 (zeros when a logit is not finite), the candidate features' convention."""
    n = len(logits)
    peak = -np.inf
    for i in range(n):
        x = float(logits[i])
        if not np.isfinite(x):
            for j in range(n):
                out[j] = 0.0
            return
        peak = max(peak, x)
    for i in range(n):
        out[i] = math.exp(float(logits[i]) - peak)
    total = _pairwise_sum(out, n)
    for i in range(n):
        out[i] /= total


@numba.njit(cache=True, error_model="numpy")
def update(state, layer, experts, step, prefill, token, weights, has_weights, gate_logits, has_gate,
           lookahead_logits, has_lookahead, clock):  # pragma: no cover - compiled  # fmt: skip
    """Account one routed event (its `experts`, before the cache serves it): CandidateFeatures.update's rules.
    `token`: the input token's row (-1 unknown); `step` < 0 is taken as 0 (prefill)."""
    (values, last_step, use_steps, per_layer, current, history, history_step, tokens_seen, scalars, step_tokens,
     token_last, routed, hidden, popularity, transition, coactivation, token_counts, next_counts) = state  # fmt: skip
    num_layers = values.shape[1]
    n = len(experts)
    scalars[CLOCK] = clock
    step = max(step, 0)
    scalars[STEP] = step
    if hidden[HIDE_TOKENS]:
        token = -1
    has_weights = has_weights and not hidden[HIDE_WEIGHTS]
    has_gate = has_gate and not hidden[HIDE_GATE]
    has_lookahead = has_lookahead and not hidden[HIDE_LOOKAHEAD]
    if not prefill and step != scalars[TOKEN_STEP]:
        scalars[PREVIOUS_INPUT] = scalars[TOKEN_ROW] if scalars[TOKEN_STEP] == step - 1 else -1
        scalars[TOKEN_STEP] = step
        scalars[TOKEN_ROW] = token
        scalars[REPEAT_FROM] = -1 if token < 0 else token_last[token]
        if token >= 0:
            token_last[token] = step
        step_tokens[step] = token
    elif token >= 0:
        scalars[TOKEN_ROW] = token
    behind = step - per_layer[DECAY_STEP, layer]
    if behind > 0:
        fast, slow = math.pow(FAST, behind), math.pow(SLOW, behind)
        long, vlong = math.pow(LONG, behind), math.pow(VLONG, behind)
        for x in range(values.shape[2]):
            values[FAST_SUM, layer, x] *= fast
            values[SLOW_SUM, layer, x] *= slow
            values[LONG_SUM, layer, x] *= long
            values[VLONG_SUM, layer, x] *= vlong
        per_layer[DECAY_STEP, layer] = step
    for i in range(n):
        e = experts[i]
        values[FAST_SUM, layer, e] += 1.0
        values[SLOW_SUM, layer, e] += 1.0
        values[LONG_SUM, layer, e] += 1.0
        values[VLONG_SUM, layer, e] += 1.0
        if use_steps[layer, e, 0] != step:  # one use per step (prefill repeats)
            for j in range(use_steps.shape[2] - 1, 0, -1):
                use_steps[layer, e, j] = use_steps[layer, e, j - 1]
            use_steps[layer, e, 0] = step
        values[COUNT, layer, e] += 1.0
        last_step[layer, e] = step
        if has_weights:
            values[WEIGHT, layer, e] = float(weights[i])
    if has_weights:
        scalars[HAS_WEIGHT] = 1
    for i in range(n):
        popularity[layer, experts[i]] += 1.0
    if prefill:
        return
    tokens_seen[layer] += 1
    routed[step, layer, :] = 0
    for i in range(n):
        routed[step, layer, experts[i]] = 1
    scalars[ROUTED_STEPS] = max(scalars[ROUTED_STEPS], step + 1)
    slot = step % WINDOW
    history[layer, slot, :] = False
    for i in range(n):
        history[layer, slot, experts[i]] = True
    history_step[layer, slot] = step
    before = per_layer[CURRENT_N, layer]
    if before and per_layer[CURRENT_STEP, layer] == step - 1:
        for a in range(before):
            for i in range(n):
                transition[layer, current[layer, a], experts[i]] += 1.0
    values[PREVIOUS, layer, :] = 0.0
    for a in range(before):
        values[PREVIOUS, layer, current[layer, a]] = 1.0
    for i in range(n):
        current[layer, i] = experts[i]
    per_layer[CURRENT_N, layer] = n
    per_layer[CURRENT_STEP, layer] = step
    if layer > 0 and per_layer[CURRENT_STEP, layer - 1] == step and per_layer[CURRENT_N, layer - 1]:
        for a in range(per_layer[CURRENT_N, layer - 1]):
            for i in range(n):
                coactivation[layer, current[layer - 1, a], experts[i]] += 1.0
    if scalars[TOKEN_ROW] >= 0:
        for i in range(n):
            token_counts[scalars[TOKEN_ROW], layer, experts[i]] += 1.0
    if scalars[PREVIOUS_INPUT] >= 0:
        for i in range(n):
            next_counts[scalars[PREVIOUS_INPUT], layer, experts[i]] += 1.0
    per_layer[HAS_GATE, layer] = 1 if has_gate else 0
    if has_gate:
        softmax_into(gate_logits, values[GATE, layer])
    if has_lookahead and layer + 1 < num_layers:
        softmax_into(lookahead_logits, values[LOOKAHEAD, layer + 1])
        per_layer[LOOKAHEAD_STEP, layer + 1] = step


@numba.njit(cache=True, error_model="numpy")
def _log_odds(table, given, g, prior, totals_out, k, uniform, ids, n, out, column):  # pragma: no cover - compiled
    """out[:, column] = log of mean_j P(e | j) / uniform over the g experts `given`, P smoothed toward `prior`
    (CandidateFeatures._conditional), for experts `ids`."""
    if g == 0:
        for c in range(n):
            out[c, column] = 0.0
        return
    for j in range(g):
        totals_out[j] = _pairwise_sum(table[given[j]], table.shape[1]) / k
    for c in range(n):
        e = ids[c]
        mean = 0.0
        for j in range(g):
            mean += (table[given[j], e] + SMOOTHING * prior[e]) / (totals_out[j] + SMOOTHING)
        out[c, column] = math.log(mean / g / uniform)


@numba.njit(cache=True, error_model="numpy")
def resident_age(clock, loaded, per_token):  # pragma: no cover - compiled
    """The resident_age column: log tokens since the expert was loaded at cache clock `loaded`."""
    return min(math.log1p(max(clock - loaded, 0) / per_token) * LOG_SCALE, 1.0)


@numba.njit(cache=True, error_model="numpy")
def resident_ages_into(clock, loaded, per_token, out):  # pragma: no cover - compiled
    """out[i] = resident_age of loaded[i]: the same compiled log1p as the rows (numpy's own may differ by an ulp)."""
    for i in range(loaded.size):
        out[i] = resident_age(clock, loaded[i], per_token)


@numba.njit(cache=True, error_model="numpy")
def candidate_rows(state, layer, ids, n, slots, capacity, top_k, loaded, history_columns, repeat_columns,
                   out):  # pragma: no cover - compiled  # fmt: skip
    """Rows [n, NUM_COLUMNS] of experts ids[:n] of `layer` into out[:n] (CandidateFeatures.layer_rows' columns).
    `slots`: the layer's own budget, `capacity`: the features' one; `loaded`: the layer's load clocks [E]."""
    (values, last_step, use_steps, per_layer, current, history, history_step, tokens_seen, scalars, step_tokens,
     _token_last, routed, _hidden, popularity, transition, coactivation, token_counts, next_counts) = state  # fmt: skip
    num_layers, num_experts = values.shape[1], values.shape[2]
    uniform = top_k / num_experts
    step = scalars[STEP]
    behind = max(step - per_layer[DECAY_STEP, layer], 0)
    fast = math.pow(FAST, behind)
    slow = math.pow(SLOW, behind) * (1 - SLOW)
    long = math.pow(LONG, behind) * (1 - LONG)
    vlong = math.pow(VLONG, behind) * (1 - VLONG)
    seen = tokens_seen[layer]
    seq_tokens = math.log1p(seen) * LOG_SCALE
    pop = popularity[layer]
    pop_total = _pairwise_sum(pop, num_experts) + num_experts
    prior = np.empty(num_experts)
    for x in range(num_experts):
        prior[x] = (pop[x] + 1.0) / pop_total * top_k
    for c in range(n):
        for f in range(NUM_COLUMNS):
            out[c, f] = 0.0
    scratch = np.empty(num_experts)
    _log_odds(transition[layer], current[layer], per_layer[CURRENT_N, layer], prior, scratch, top_k, uniform, ids,
              n, out, TRANSITION)  # fmt: skip
    first = not (layer > 0 and per_layer[CURRENT_STEP, layer - 1] == step)
    if first:
        for c in range(n):
            out[c, COACTIVATION] = 0.0
    else:
        _log_odds(coactivation[layer], current[layer - 1], per_layer[CURRENT_N, layer - 1], prior, scratch, top_k,
                  uniform, ids, n, out, COACTIVATION)  # fmt: skip
    # transition_mix: sum_j w_j P(e | j) / sum_j w_j with w the layer's slow decayed counts
    weight = values[SLOW_SUM, layer]
    weight_total = _pairwise_sum(weight, num_experts)
    table = transition[layer]
    share = np.empty(num_experts)  # w_j / sum w and the smoothed denominator of P(. | j), once per call
    if weight_total > 0:
        for j in range(num_experts):
            scratch[j] = _pairwise_sum(table[j], num_experts) / top_k + SMOOTHING
            share[j] = weight[j] / weight_total
    token = scalars[TOKEN_ROW]
    token_sum = 0.0
    next_sum = 0.0
    if token >= 0:
        token_sum = _pairwise_sum(token_counts[token, layer], num_experts)
        next_sum = _pairwise_sum(next_counts[token, layer], num_experts)
    gate = per_layer[HAS_GATE, layer] != 0
    lookahead = per_layer[LOOKAHEAD_STEP, layer] == step
    has_weight = scalars[HAS_WEIGHT] != 0
    per_token = num_layers * top_k
    clock = scalars[CLOCK]
    position = layer / max(num_layers - 1, 1)
    # recent window slots
    recent = np.empty(WINDOW, dtype=np.bool_)
    for s in range(WINDOW):
        recent[s] = history_step[layer, s] > step - WINDOW
    start = scalars[REPEAT_FROM]
    bigram = 0.0
    if start >= 0:
        before = step_tokens[start - 1] if start - 1 >= 0 else -1
        previous = step_tokens[step - 1] if step - 1 >= 0 else -1
        bigram = 1.0 if before >= 0 and before == previous else 0.0
    for c in range(n):
        e = ids[c]
        row = out[c]
        row[BUDGET] = slots / num_experts
        row[TOP_K_PER_SLOT] = top_k / max(slots, 1) if slots != capacity else top_k / capacity
        age = step - last_step[layer, e]
        row[RECENCY] = min(math.log1p(max(age, 0)) * LOG_SCALE, 1.0)
        count = values[COUNT, layer, e]
        row[SEQ_COUNT] = math.log1p(count) * LOG_SCALE
        row[DECAY_FAST] = values[FAST_SUM, layer, e] * fast
        row[DECAY_SLOW] = values[SLOW_SUM, layer, e] * slow
        row[DECAY_LONG] = values[LONG_SUM, layer, e] * long
        row[DECAY_VLONG] = values[VLONG_SUM, layer, e] * vlong
        if history_columns:
            known = 0
            gap_sum = 0
            for i in range(GAPS):
                newer, older = use_steps[layer, e, i], use_steps[layer, e, i + 1]
                if older > NEVER:
                    gap = newer - older
                    row[GAP_1 + i] = min(math.log1p(gap) * LOG_SCALE, 1.0)
                    known += 1
                    gap_sum += gap
                else:
                    row[GAP_1 + i] = 1.0
            if known:
                mean = gap_sum / known
                row[GAP_MEAN] = min(math.log1p(mean) * LOG_SCALE, 1.0)
                ratio = math.log((max(age, 0) + 1.0) / (mean + 1.0)) * LOG_SCALE
                row[OVERDUE] = min(max(ratio, -1.0), 1.0)
            else:
                row[GAP_MEAN] = 1.0
                row[OVERDUE] = 0.0
        if repeat_columns:
            row[REPEAT_MISSING] = 1.0 if start < 0 else 0.0
            if start >= 0:
                row[REPEAT_BIGRAM] = bigram
                for k in range(1, REPEAT + 1):
                    if start + k > step:
                        break
                    if routed[start + k, layer, e]:
                        if k == 1:
                            row[REPEAT_NEXT] = 1.0
                        row[REPEAT_SOON] += 0.5 ** (k - 1)
        row[SEQ_TOKENS] = seq_tokens
        used = 0
        for s in range(WINDOW):
            if recent[s] and history[layer, s, e]:
                used += 1
        row[WINDOW_COL] = used / WINDOW
        row[SEQ_SHARE] = count / (seen + 1.0) / uniform
        row[LONG_SHARE] = (pop[e] + 1.0) / pop_total * num_experts
        if weight_total > 0:
            smoothed = SMOOTHING * prior[e]
            mix = 0.0
            for j in range(num_experts):
                mix += share[j] * ((table[j, e] + smoothed) / scratch[j])
            row[TRANSITION_MIX] = math.log(mix / uniform)
        row[FIRST_LAYER] = 1.0 if first else 0.0
        if token_sum > 0:
            p = (token_counts[token, layer, e] + SMOOTHING * prior[e]) / (token_sum / top_k + SMOOTHING)
            row[TOKEN] = math.log(p / uniform)
        else:
            row[TOKEN_MISSING] = 1.0
        if next_sum > 0:
            p = (next_counts[token, layer, e] + SMOOTHING * prior[e]) / (next_sum / top_k + SMOOTHING)
            row[TOKEN_NEXT] = math.log(p / uniform)
        if gate:
            row[GATE_PROB] = values[GATE, layer, e]
        else:
            row[GATE_MISSING] = 1.0
        if lookahead:
            row[LOOKAHEAD_PROB] = values[LOOKAHEAD, layer, e]
        else:
            row[LOOKAHEAD_MISSING] = 1.0
        row[LAST_WEIGHT] = values[WEIGHT, layer, e]
        row[WEIGHT_MISSING] = 0.0 if has_weight else 1.0
        row[PREVIOUS_TOKEN] = values[PREVIOUS, layer, e]
        row[RESIDENT_AGE] = resident_age(clock, loaded[e], per_token)
        row[LAYER_POSITION] = position
