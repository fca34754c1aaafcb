"""The compiled replay of the set-scorer eviction plug-ins (agents/scored_replay.py) decides access for access as
one ExpertCacheState.route call per event with the plug-in's Python observe and eviction_scores does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_env.agents.candidate_features import FEATURES
from moe_env.agents.imitation import ImitationPolicy, ScorerEviction
from moe_env.agents.scored_replay import replays_compiled
from moe_env.agents.set_scorer import NumpyScorer, SetScorerNet

from moe_env.allocation import Allocation
from moe_env.errors import CheckpointError
from moe_env.policy import PolicyError, build_policy
from moe_env.sim import Replayer, cost_model_for, kernel_replay, replay
from moe_env.trace import SequenceTrace, Trace, TraceMeta, load_trace

DSV2 = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "dsv2lite-puffin"


def _per_event(trace: Trace, policy, allocation, warm: bool, prefill: str = "chunked"):
    """(hit, slot, evicted key) per access and the tally of one route call per event."""
    cost = cost_model_for(trace.meta, None)
    replayer = Replayer(trace.meta, policy, allocation, cost, warm=warm, prefill=prefill)
    assert replayer.cache.routes_in_kernel is False
    num_experts = trace.meta.num_experts
    accesses = []
    for sequence in trace.sequences:
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            for plan in replayer.process(routing).plans:
                loads = iter(plan.loads)
                for hit, slot in zip(plan.hit, plan.slots, strict=True):
                    evicted = -1
                    if not hit and not plan.event.bypass:
                        load = next(loads)
                        evicted = -1 if load.evicted < 0 else load.evicted_layer * num_experts + load.evicted
                    accesses.append((int(hit), slot, evicted))
    return accesses, replayer.tally()


def _compiled(trace: Trace, policy, allocation, warm: bool, prefill: str = "chunked"):
    cost = cost_model_for(trace.meta, None)
    replayer = Replayer(trace.meta, policy, allocation, cost, warm=warm, prefill=prefill)
    router = policy.compiled_router()
    assert router is not None
    _, events = kernel_replay(replayer, trace.sequences, router)
    accesses = [(flag & 1, slot, evicted) for flag, slot, evicted in events.acc_out.tolist()]
    return accesses, replayer.tally()


def _same_decisions(trace: Trace, spec: str, allocation, warm: bool = False) -> int:
    want, want_tally = _per_event(trace, build_policy(spec), allocation, warm)
    got, got_tally = _compiled(trace, build_policy(spec), allocation, warm)
    assert got == want  # every hit flag, slot and victim
    assert got_tally == want_tally  # counters, tokens and every per-sequence time
    return sum(1 for _, _, evicted in got if evicted >= 0)


def _profile(trace: Trace, low: int) -> Allocation:
    meta = trace.meta
    return Allocation.per_layer("profile", meta.num_experts, [low + layer % 3 for layer in range(meta.num_layers)])


@pytest.mark.parametrize("name", ["builtin:tiny-olmoe/eval", "builtin:tiny-mixtral/eval"])
@pytest.mark.parametrize("warm", [False, True])
def test_imitation_decides_as_per_event(name, warm):
    trace = load_trace(name)
    slots = 8 if trace.meta.num_experts > 8 else 4
    assert _same_decisions(trace, "imitation", slots, warm) > 100
    assert _same_decisions(trace, "imitation", _profile(trace, slots - 1), warm) > 100


@pytest.mark.parametrize("spec", ["ppo", "imitation-shared", "imitation:tables=none"])
def test_other_scorers_decide_as_per_event(spec):
    trace = load_trace("builtin:tiny-olmoe/eval")
    assert _same_decisions(trace, spec, 8) > 100


def test_the_shared_scorer_in_one_pool_decides_as_per_event():
    trace = load_trace("builtin:tiny-olmoe/eval")
    meta = trace.meta
    pool = Allocation.one_pool(meta.num_layers, meta.num_experts, 8 * meta.num_layers)
    assert _same_decisions(trace, "imitation-shared", pool) > 100
    assert _same_decisions(trace, "imitation-shared", pool, warm=True) > 100


@pytest.mark.skipif(not DSV2.is_dir(), reason="../shared/traces is absent")
def test_imitation_on_real_routing_decides_as_per_event():
    """DeepSeek-V2-Lite eval prompts (string tokens through the import's vocabulary, no weights or logits)."""
    trace = load_trace(f"{DSV2}#id=901-902")
    assert _same_decisions(trace, "imitation", 16) > 1000
    assert _same_decisions(trace, "imitation", _profile(trace, 14)) > 1000


def test_replay_takes_the_compiled_path_only_for_the_plug_ins_own_hooks():
    trace = load_trace("builtin:tiny-olmoe/eval")
    cost = cost_model_for(trace.meta, None)

    class MostRecentOut(ImitationPolicy):  # its own eviction_scores: the general path must ask it
        def eviction_scores(self, layer, candidates, cache):
            return -cache.last_use(layer)[candidates].astype(float)

    policy = MostRecentOut()
    assert not replays_compiled(policy) and policy.compiled_router() is None
    assert replays_compiled(ImitationPolicy())
    fast, slow = replay(trace, policy, 8, cost), replay(trace, MostRecentOut(), 8, cost, fast=False)
    assert fast == slow
    assert fast.counters.hits != replay(trace, ImitationPolicy(), 8, cost).counters.hits


def test_a_needed_signal_and_nan_scores_are_refused_on_the_compiled_path_too():
    trace = load_trace("builtin:tiny-olmoe/eval")
    cost = cost_model_for(trace.meta, None)
    no_tokens = Trace(trace.meta, [replace(s, output_ids=None) for s in trace.sequences])
    for fast in (True, False):
        policy = ImitationPolicy()
        policy.needs = ["tokens"]
        with pytest.raises(CheckpointError, match="needs the tokens"):
            replay(no_tokens, policy, 8, cost, fast=fast)
        broken = ImitationPolicy()
        broken.scorer.layers[0][0][:] = np.nan
        with pytest.raises(PolicyError, match="NaN eviction scores"):
            replay(trace, broken, 8, cost, fast=fast)


def test_numpy_scorer_scores_each_row_on_its_own():
    """A row's score does not depend on the rows beside it (the compiled replay scores only the candidates, the
    plug-in a layer's rows), and equals the torch network's."""
    torch.manual_seed(0)
    net = SetScorerNet(12, 16)
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter)
    scorer = NumpyScorer(net)
    rows = np.random.default_rng(0).normal(size=(40, 12)) * 3
    batch = scorer(rows)
    alone = np.concatenate([scorer(rows[i : i + 1]) for i in range(len(rows))])
    np.testing.assert_array_equal(batch, alone)
    np.testing.assert_array_equal(scorer(rows[::-1])[::-1], batch)
    want = net.double()(torch.from_numpy(rows)).detach().numpy()
    np.testing.assert_allclose(batch, want, rtol=1e-9, atol=1e-9)
    assert isinstance(ImitationPolicy(), ScorerEviction)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    experts=st.integers(2, 8),
    top_k=st.integers(1, 3),
    extra=st.integers(0, 6),
    prompt=st.integers(0, 4),
    warm=st.booleans(),
    kind=st.sampled_from(["uniform", "profile", "shared"]),
    prefill=st.sampled_from(["chunked", "bypass"]),
    signals=st.booleans(),
)
def test_random_traces_decide_as_per_event(seed, experts, top_k, extra, prompt, warm, kind, prefill, signals):
    """Random shapes, budgets, pools, prefill modes and signals (weights, gate and lookahead logits, tokens that
    repeat) with a random set scorer that ranks across layers: identical accesses and tallies on both paths."""
    top_k = min(top_k, experts)
    rng = np.random.default_rng(seed)
    layers = 3

    def rows(n):
        return np.asarray([[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(n)])

    sequences = []
    for _ in range(int(rng.integers(1, 4))):
        steps = int(rng.integers(1, 25))
        decode = rows(steps)
        decode[rng.random(decode.shape[:2]) < 0.1] = -1  # absent cells
        logits = rng.normal(size=(steps, layers, experts)).astype(np.float32) if signals else None
        sequences.append(SequenceTrace(
            decode.astype(np.int16),
            weights=rng.random((steps, layers, top_k)).astype(np.float32) if signals else None,
            gate_logits=logits, lookahead_logits=None if logits is None else logits[::-1].copy(),
            prefill_experts=rows(prompt).astype(np.int16) if prompt else None,
            prefill_gate_logits=rng.normal(size=(layers, experts)).astype(np.float32) if signals else None,
            output_ids=rng.integers(0, 4, steps + 1).astype(np.int32) if signals else None,
        ))  # fmt: skip
    meta = TraceMeta("toy", layers, experts, top_k, "test", expert_bytes=1_000_000_000)
    if kind == "shared":
        allocation = Allocation.one_pool(layers, experts, min(top_k + extra, layers * experts))
    elif kind == "profile":
        slots = [min(top_k + int(rng.integers(0, extra + 1)), experts) for _ in range(layers)]
        allocation = Allocation.per_layer("profile", experts, slots)
    else:
        allocation = Allocation.uniform(layers, experts, min(top_k + extra, experts))
    torch.manual_seed(seed % 1000)
    net = SetScorerNet(len(FEATURES), 8)
    if seed % 3 == 0:  # every score equal: the ties go to the least recently used, then the lowest key
        with torch.no_grad():
            net.body[4].weight.zero_()
    trace = Trace(meta, sequences)

    def build():
        return ScorerEviction(NumpyScorer(net), tables=None, across_layers=True)

    want, want_tally = _per_event(trace, build(), allocation, warm, prefill)
    got, got_tally = _compiled(trace, build(), allocation, warm, prefill)
    assert got == want
    assert got_tally == want_tally
