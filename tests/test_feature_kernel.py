"""The compiled candidate features (agents/feature_kernel.py) against the former numpy code, every column."""

from __future__ import annotations

from dataclasses import replace

import candidate_features_reference as reference
import numpy as np
import pytest
from moe_env.agents import feature_kernel
from moe_env.agents.candidate_features import FEATURES, HIDEABLE, CandidateFeatures
from moe_env.agents.model_tables import build_tables

from moe_env.allocation import Allocation
from moe_env.cache import ExpertCacheState
from moe_env.policy import make_policy
from moe_env.routing import route_events
from moe_env.sim import model_spec
from moe_env.trace import Trace, load_trace

# numba's exp/log/pow are libm's, numpy's may be its SIMD ones (a few ulps apart), and the transition mixture is a
# dot product summed in another order: equal to 1e-12, far below what moves a score
TOLERANCE = 1e-12


def test_kernel_columns_are_the_feature_columns():
    names = [name.upper() for name in FEATURES]
    for index, name in enumerate(names):
        column = {"WINDOW": "WINDOW_COL"}.get(name, name)
        assert getattr(feature_kernel, column) == index, name
    assert len(FEATURES) == feature_kernel.NUM_COLUMNS


def _compare(trace: Trace, capacity, tables=None, hidden=(), columns=None) -> int:
    spec = model_spec(trace.meta)
    slots = capacity if isinstance(capacity, int) else capacity.layer_slots(0)
    new = CandidateFeatures(spec, slots, tables, columns)
    old = reference.CandidateFeatures(spec, slots, tables, columns)
    cache = ExpertCacheState(spec, capacity, make_policy("lru"))
    compared = 0
    for sequence in trace.sequences:
        cache.begin_sequence()
        new.begin_sequence(hidden)
        old.begin_sequence(hidden)
        for routing in sequence.routings():
            for event in route_events(routing, cache):
                new.update(event, cache.clock)
                old.update(event, cache.clock)
                for layer in {event.layer, min(event.layer + 1, spec.num_layers - 1)}:
                    got, want = new.layer_rows(layer, cache), old.layer_rows(layer, cache)
                    bad = ~np.isclose(got, want, rtol=TOLERANCE, atol=TOLERANCE)
                    assert not bad.any(), [FEATURES[c] for c in np.flatnonzero(bad.any(axis=0))]
                    compared += 1
                assert (new.step, new.token, new.has_weight, new.clock) == (old.step, old.token, old.has_weight,
                                                                            old.clock)  # fmt: skip
                assert [new.current[layer] for layer in range(spec.num_layers)] == old.current
                cache.route(event)
    np.testing.assert_array_equal(new.transition, old.transition)
    np.testing.assert_array_equal(new.coactivation, old.coactivation)
    np.testing.assert_array_equal(new.popularity, old.popularity)
    return compared


@pytest.mark.parametrize("name", ["builtin:tiny-mixtral/eval", "builtin:tiny-olmoe/eval"])
def test_compiled_rows_equal_the_numpy_rows(name):
    """Every column of every layer's rows after every event, over whole traces (their gate weights, gate and
    lookahead logits, tokens and prefill), cold sequences with the online statistics carried across them."""
    trace = load_trace(name)
    assert _compare(Trace(trace.meta, trace.sequences[:5]), 4) > 100


def test_compiled_rows_with_tables_hidden_signals_repeats_and_a_profile():
    trace = load_trace("builtin:tiny-mixtral/eval")
    tables = build_tables(load_trace("builtin:tiny-mixtral/train"))
    # repeated input tokens (repeat_* columns fire) and tokens the tables know
    seqs = [replace(s, output_ids=(np.arange(s.num_steps + 1) % 7).astype(np.int32)) for s in trace.sequences[:2]]
    repeated = Trace(trace.meta, seqs)
    assert _compare(repeated, 3, tables) > 100
    assert _compare(repeated, 3, tables, hidden=HIDEABLE) > 100
    assert _compare(repeated, 3, None, columns=["recency"]) > 100  # history and repeat columns off
    meta = trace.meta
    slots = [3 + (layer % 3) for layer in range(meta.num_layers)]
    assert _compare(repeated, Allocation.per_layer("profile", meta.num_experts, slots), tables) > 100


def test_token_tables_grow_as_new_tokens_appear():
    """The token -> row map adds rows past the preallocated ones without losing the counts so far."""
    trace = load_trace("builtin:tiny-mixtral/eval")
    seqs = [replace(s, output_ids=(1000 + np.arange(s.num_steps + 1)).astype(np.int32)) for s in trace.sequences[:2]]
    assert _compare(Trace(trace.meta, seqs), 4) > 100
