"""The compiled demand-only kernels decide access for access as the general path (ExpertCacheState.route) does."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_env.allocation import Allocation
from moe_env.cache import FIRST_TOKENS
from moe_env.costmodel import CostModel, ExpertProfile, HardwareProfile
from moe_env.policy import build_policy
from moe_env.sim import Replayer
from moe_env.sim_kernels import KINDS, lru_kernel, pool_events, replay_hits, stream_events
from moe_env.trace import SequenceTrace, TraceMeta

COST = CostModel(HardwareProfile("test", 1.0, 0.0, 10.0, 0.5), ExpertProfile("test", 1_000_000_000, 2, 4, 1))


def _general_flags(meta, sequences, policy, allocation, warm) -> tuple[dict[int, list[int]], int]:
    """Hit flags of the general path per kernel segment (route order within each), and its eviction count."""
    replayer = Replayer(meta, build_policy(policy), allocation, COST, warm=warm)
    if warm:
        replayer.begin_stream(sequences)
    flags: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            for plan in replayer.process(routing).plans:
                stream = 0 if warm else index
                segment = stream if allocation.shared else stream * meta.num_layers + plan.event.layer
                flags.setdefault(segment, []).extend(int(hit) for hit in plan.hit)
    return flags, replayer.cache.counters.evictions


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    experts=st.integers(2, 8),
    top_k=st.integers(1, 3),
    extra=st.integers(0, 10),
    prompt=st.integers(0, 4),
    warm=st.booleans(),
    kind=st.sampled_from(["uniform", "profile", "shared"]),
)
def test_kernel_hit_flags_equal_the_general_paths(seed, experts, top_k, extra, prompt, warm, kind):
    top_k = min(top_k, experts)
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(experts, 0.4))
    layers = 3

    def rows(n):
        return np.asarray(
            [[rng.choice(experts, top_k, replace=False, p=skew) for _ in range(layers)] for _ in range(n)]
        )

    sequences = []
    for _ in range(int(rng.integers(1, 4))):
        decode = rows(int(rng.integers(1, 25)))
        decode[rng.random(decode.shape[:2]) < 0.1] = -1  # absent cells
        sequences.append(SequenceTrace(decode.astype(np.int16), prefill_experts=rows(prompt).astype(np.int16)
                                       if prompt else None))  # fmt: skip
    meta = TraceMeta("toy", layers, experts, top_k, "test", expert_bytes=1_000_000_000)
    if kind == "shared":
        allocation = Allocation.one_pool(layers, experts, min(top_k + extra, layers * experts))
    elif kind == "profile":
        slots = [min(top_k + int(rng.integers(0, extra + 1)), experts) for _ in range(layers)]
        allocation = Allocation.per_layer("profile", experts, slots)
    else:
        allocation = Allocation.uniform(layers, experts, min(top_k + extra, experts))
    build = stream_events if allocation.shared else pool_events
    events = build(sequences, allocation, FIRST_TOKENS, warm)
    for policy in KINDS:
        hits, evictions = replay_hits(policy, events)
        expected, general_evictions = _general_flags(meta, sequences, policy, allocation, warm)
        for segment in range(len(events.seg_capacity)):
            lo, hi = events.offsets[events.seg_start[segment]], events.offsets[events.seg_start[segment + 1]]
            assert hits[lo:hi].tolist() == expected.get(segment, []), (policy, segment)
        assert evictions == general_evictions, policy


def test_lru_kernel_on_a_list_of_events():
    flags = bytearray()
    # two slots: [0, 1] miss miss; [2] evicts 0; [0] evicts 1 (the least recent); [2] hit
    assert lru_kernel([[0, 1], [2], [0], [2]], 2, 3, flags) == 2
    assert list(flags) == [0, 0, 0, 0, 1]
