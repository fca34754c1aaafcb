"""Replay of a set-scorer eviction plug-in (imitation, imitation-shared, the PPO eviction scorer) in compiled code.

The general path asks Python at every event (the plug-in's ``observe``) and at every eviction (its
``eviction_scores``). Here one compiled loop does both for a whole sequence: it advances the cache kernel
(moe_env.cache_kernel.advance, the cache's only rules) until it stops for a victim, feeds the candidate features
(agents/feature_kernel.update, the plug-in's own state) every event up to that one, builds the candidates' rows
(feature_kernel.candidate_rows) and scores them (agents/scorer_kernel.score_rows, NumpyScorer's forward), and
evicts the lowest (score, last use, key), as ExpertCacheState._python_victim does. An event's evictions share its
scores (nothing a feature reads changes within an event), as the plug-in's cached rows do. The functions are the
plug-in's own, so decisions are identical to the per-event path (tests/test_scored_replay.py, one for one).

Sequences run one after another: the features' online statistics (long-run share, transitions, token tables)
carry over from one sequence to the next, so the sequences of a cold replay are not independent for these
policies, and no Python runs per decision, so there is no forward to batch across them.

numba's on-disk cache (``cache=True``) is keyed by this file alone, while the machine code embeds what it calls
(cache_kernel.advance, feature_kernel, scorer_kernel): after editing those, delete
``agents/__pycache__/scored_replay.*`` (or touch this file); a fresh checkout compiles afresh.
"""

from __future__ import annotations

import numba
import numpy as np
from moe_env.agents.candidate_features import token_key
from moe_env.agents.feature_kernel import NUM_COLUMNS, candidate_rows, update
from moe_env.agents.imitation import CandidateFeaturePolicy, CheckpointScorerEviction, ScorerEviction
from moe_env.agents.scorer_kernel import score_rows

from moe_env.cache import EventArrays, ExpertCacheState
from moe_env.cache_kernel import CLOCK, DONE, PREFILL, RANK_PYTHON, SERIAL, advance, no_aging
from moe_env.policy import Policy, validate_scores
from moe_env.routing import route_events
from moe_env.trace import SequenceTrace

NAN_SCORE = -1  # the loop's status when the scorer returned NaN (the caller reports it as the plug-in would)
_HOOKS = ("observe", "eviction_scores", "begin_sequence", "reset", "prefetch", "bind_cost_model")
_OWN_CLASSES = (Policy, CandidateFeaturePolicy, ScorerEviction, CheckpointScorerEviction)


def replays_compiled(policy: Policy) -> bool:
    """Whether `policy` is a set-scorer eviction plug-in whose hooks are all this module's (a subclass that
    overrides one is replayed through the general path)."""
    if not isinstance(policy, ScorerEviction):
        return False
    for hook in _HOOKS:
        owner = next((c for c in type(policy).__mro__ if hook in c.__dict__), None)
        if owner not in _OWN_CLASSES or hook in vars(policy):
            return False
    return True


@numba.njit(cache=True, error_model="numpy")
def _feed(state, ev, acc_off, experts, e, first, clock, token_of, weights, has_weights, gate, has_gate, lookahead,
          has_lookahead):  # pragma: no cover - compiled  # fmt: skip
    """feature_kernel.update for event e; the per-event signals are indexed from the span's first event."""
    lo, hi = acc_off[e], acc_off[e + 1]
    base = acc_off[first]
    i = e - first
    update(state, ev[e, 0], experts[lo:hi], ev[e, 1], (ev[e, 2] & PREFILL) != 0, token_of[i],
           weights[lo - base : hi - base], has_weights[i], gate[i], has_gate[i], lookahead[i], has_lookahead[i],
           clock)  # fmt: skip


@numba.njit(cache=True, error_model="numpy")
def route_scored(ints, flags, key_in, pools, layer_pool, scalars, stamp, cursor, cand, scratch, ev, acc_off,
                 experts, req_off, req_key, acc_out, req_out, first, end, num_experts, expert_bytes, state, token_of,
                 weights, has_weights, gate, has_gate, lookahead, has_lookahead, layer_slots, capacity, top_k,
                 history_columns, repeat_columns, mean, inv_std, clip, w1, b1, w2, b2, w3,
                 b3):  # pragma: no cover - compiled  # fmt: skip
    """Route events first..end-1 through the cache kernel, ranking every victim with the set scorer on the
    features in `state` (fed every event, before it routes; its signals are per event and per access of the
    span). Returns DONE or NAN_SCORE."""
    num_keys = ints.shape[1] * ints.shape[2]
    score_of = np.zeros(num_keys)
    scored_at = np.full(num_keys, -1, dtype=np.int64)  # the event serial a key's score belongs to
    ids = np.empty(num_experts, dtype=np.int64)
    rows = np.empty((num_experts, NUM_COLUMNS))
    scores = np.empty(num_experts)
    no_table, no_index, no_rng = np.zeros((1, 1)), np.zeros(1, dtype=np.int64), np.zeros(0)
    no_counts, aging = np.zeros((1, 1, 1)), no_aging()
    last_use = ints[1].reshape(-1)
    loaded_at = ints[3]
    clock0 = scalars[CLOCK] - acc_off[first]  # an event starts at clock0 + acc_off[event]: one tick per access
    cursor[:] = 0
    cursor[0] = first
    fed = first
    victim = -1
    while True:
        status = advance(ints, flags, key_in, pools, layer_pool, scalars, stamp, ev, acc_off, experts, req_off,
                         req_key, acc_out, req_out, cursor, cand, victim, end, RANK_PYTHON, 1.0, no_table,
                         aging, no_index, no_index, num_experts, expert_bytes, False, no_counts, 0, scratch,
                         no_rng)  # fmt: skip
        victim = -1
        if status == DONE:
            break
        e = cursor[0]
        while fed <= e:
            _feed(state, ev, acc_off, experts, fed, first, clock0 + acc_off[fed], token_of, weights, has_weights, gate,
                  has_gate, lookahead, has_lookahead)  # fmt: skip
            fed += 1
        n = cursor[4]
        if n == 1:
            victim = cand[0]
            continue
        serial = scalars[SERIAL]
        j = 0
        while j < n:  # candidates ascend by key: one block per layer
            layer = cand[j] // num_experts
            k = j
            m = 0
            while k < n and cand[k] // num_experts == layer:
                if scored_at[cand[k]] != serial:
                    ids[m] = cand[k] - layer * num_experts
                    m += 1
                k += 1
            if m:
                candidate_rows(state, layer, ids, m, layer_slots[layer], capacity, top_k, loaded_at[layer],
                               history_columns, repeat_columns, rows)  # fmt: skip
                score_rows(rows, m, mean, inv_std, clip, w1, b1, w2, b2, w3, b3, scores)
                for t in range(m):
                    if np.isnan(scores[t]):
                        return NAN_SCORE
                    key = layer * num_experts + ids[t]
                    score_of[key] = scores[t]
                    scored_at[key] = serial
            j = k
        best = cand[0]
        for c in range(1, n):
            key = cand[c]
            if score_of[key] < score_of[best] or (score_of[key] == score_of[best] and (
                    last_use[key] < last_use[best] or (last_use[key] == last_use[best] and key < best))):  # fmt: skip
                best = key
        victim = best
    while fed < end:  # the events after the last eviction still feed the features
        _feed(state, ev, acc_off, experts, fed, first, clock0 + acc_off[fed], token_of, weights, has_weights, gate,
              has_gate, lookahead, has_lookahead)  # fmt: skip
        fed += 1
    return DONE


def route_sequence(policy: ScorerEviction, cache: ExpertCacheState, events: EventArrays, first: int, end: int,
                   sequence: SequenceTrace, vocab: list | None) -> None:  # fmt: skip
    """Route events first..end-1 (those of `sequence`, moe_env.sim_kernels.sequence_events) through `cache` for
    `policy` (replays_compiled), after cache.begin_sequence: the plug-in's features end as the general path
    leaves them."""
    features = policy.features
    spec = cache.spec
    if isinstance(policy, CheckpointScorerEviction) and policy.needs:
        _check_signals(policy, sequence, cache, vocab)
    ev = events.ev[first:end]
    steps, layers = ev[:, 1], ev[:, 0]
    decode = steps >= 0
    if decode.any():
        features.reserve_steps(int(steps.max()) + 1)
    token_of = np.full(len(ev), -1, dtype=np.int64)
    ids = sequence.output_ids
    if ids is not None and decode.any():
        known = decode & (steps < len(ids))
        unique, inverse = np.unique(np.asarray(ids)[steps[known]].astype(np.int64), return_inverse=True)
        rows = np.asarray([_token_row(features, int(t), vocab) for t in unique.tolist()], dtype=np.int64)
        token_of[known] = rows[inverse]
    lo, hi = int(events.acc_off[first]), int(events.acc_off[end])
    weights = np.zeros(hi - lo)
    has_weights = np.zeros(len(ev), dtype=bool)
    if sequence.weights is not None and decode.any():
        has_weights[:] = decode
        mask = np.repeat(decode, np.diff(events.acc_off[first : end + 1]))
        weights[mask] = sequence.weights[steps[decode], layers[decode]].astype(np.float64).reshape(-1)
    gate, has_gate = _logits(sequence.gate_logits, sequence.prefill_gate_logits, ev, spec, False)
    lookahead, has_lookahead = _logits(sequence.lookahead_logits, sequence.prefill_lookahead_logits, ev, spec, True)
    arrays = cache.kernel_arrays()
    scorer = policy.scorer
    layer_slots = np.asarray([cache.layer_capacity(layer) for layer in range(spec.num_layers)], dtype=np.int64)
    status = route_scored(*arrays, events.ev, events.acc_off, events.experts, events.req_off, events.req_key,
                          events.acc_out, events.req_out, first, end, spec.num_experts, spec.expert_bytes,
                          features.arrays(), token_of, weights, has_weights, gate, has_gate, lookahead, has_lookahead,
                          layer_slots, features.capacity, spec.top_k, features._history, features._repeats,
                          *scorer.weights())  # fmt: skip
    cache.fold_counters()
    features.changed()
    if policy._across is not None:
        policy._across.begin(features)  # its rows were not kept up to date here
    if status != DONE:
        validate_scores(np.asarray([np.nan]), 1, policy)


def _token_row(features, token: int, vocab: list | None) -> int:
    """The features' row of the input token `token` (an import-local id is its vocabulary text, as Replayer.process
    maps it)."""
    value: int | str = vocab[token] if vocab is not None and 0 <= token < len(vocab) else token
    key = token_key(value)
    return -1 if key is None else features.token_row(key)


def _logits(per_step, prefill, ev, spec, lookahead: bool) -> tuple[np.ndarray, np.ndarray]:
    """[n, E] float64 logits of each event and [n] whether it has them (route_events' rule: decode, the cell's;
    prefill, the last prompt token's; lookahead, none for the last layer)."""
    n = len(ev)
    steps, layers = ev[:, 1], ev[:, 0]
    decode = steps >= 0
    present = np.zeros(n, dtype=bool)
    usable = layers + 1 < spec.num_layers if lookahead else np.ones(n, dtype=bool)
    if per_step is not None:
        present |= decode & usable
    if prefill is not None:
        present |= ~decode & usable
    if not present.any():
        return np.zeros((n, 1)), present
    out = np.zeros((n, spec.num_experts))
    chosen = decode & present
    if chosen.any():
        out[chosen] = per_step[steps[chosen], layers[chosen]]
    chosen = ~decode & present
    if chosen.any():
        out[chosen] = prefill[layers[chosen]]
    return out, present


def _check_signals(policy: CheckpointScorerEviction, sequence: SequenceTrace, cache, vocab) -> None:
    """The signal check the plug-in's observe makes on a sequence's first decode event."""
    from dataclasses import replace

    for routing in sequence.routings():
        if routing.prefill:
            continue
        if vocab is not None and isinstance(routing.token, int) and 0 <= routing.token < len(vocab):
            routing = replace(routing, token=vocab[routing.token])
        for event in route_events(routing, cache):
            policy.check_signals(event)
            return
