"""A replay in the cache kernel (a sequence at a time, built-in rankings and prefetchers inside it) decides access
for access, and prefetch for prefetch, as one ExpertCacheState.route call per event with the plug-in's own Python
eviction_scores, observe and prefetch does."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_env.allocation import Allocation
from moe_env.costmodel import CostModel, ExpertProfile, HardwareProfile
from moe_env.policy import CombinedPolicy, Policy, build_policy
from moe_env.sim import Replayer, kernel_replay
from moe_env.sim_kernels import lru_kernel
from moe_env.trace import SequenceTrace, TraceMeta

COST = CostModel(HardwareProfile("test", 1.0, 0.0, 10.0, 0.5), ExpertProfile("test", 1_000_000_000, 2, 4, 1))
# every built-in ranking, all in the kernel
EVICTION = ["lru", "lfu", "fifo", "belady", "lfu-decay:decay=0.8", "lrfu:lam=0.3", "random:seed=3", "lfuda"]
PER_LAYER_ONLY = {"lfuda"}  # does not rank across layers: no shared pool
PREFETCH = [None, "lookahead", "oracle", "affinity", "affinity:prior=0.0"]  # prior 0: NaN scores (0 / 0)


class PythonLRU(Policy):
    """LRU ranked in Python: every victim is a stop of the kernel and one eviction_scores call per layer."""

    name = "python-lru"
    ranks_across_layers = True


def _python_twin(policy: Policy) -> Policy:
    """The same plug-in with its declarations dropped (a subclass: replay_kernel/replay_prefetch are never
    inherited), so route() asks its own eviction_scores, observe and prefetch in Python."""
    if isinstance(policy, CombinedPolicy):
        return CombinedPolicy(_python_twin(policy.evict), _python_twin(policy.prefetcher))
    policy.__class__ = type(f"Python{type(policy).__name__}", (type(policy),), {})
    return policy


def _general(meta, sequences, policy, allocation, warm, prefill):
    """Per-access (hit, slot) and per-prefetch (layer, expert, slot) of one route call per event, and counters."""
    replayer = Replayer(meta, policy, allocation, COST, warm=warm, prefill=prefill)
    if warm:
        replayer.begin_stream(sequences)
    accesses, prefetches = [], []
    for sequence in sequences:
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            for plan in replayer.process(routing).plans:
                accesses += [(int(h), s) for h, s in zip(plan.hit, plan.slots, strict=True)]
                prefetches += [(p.layer, p.expert, p.slot, p.evicted, p.evicted_layer) for p in plan.prefetches]
    return accesses, prefetches, replayer.finish()


def _kernel(meta, sequences, policy, allocation, warm, prefill):
    replayer = Replayer(meta, policy, allocation, COST, warm=warm, prefill=prefill)
    assert replayer.cache.routes_in_kernel
    _, events = kernel_replay(replayer, sequences)
    accesses = [(flag & 1, slot) for flag, slot, _ in events.acc_out.tolist()]
    prefetches = []
    for key, (slot, evicted) in zip(events.req_key.tolist(), events.req_out.tolist(), strict=True):
        if slot >= 0:
            gone_layer, gone = divmod(evicted, meta.num_experts) if evicted >= 0 else (-1, -1)
            prefetches.append((*divmod(key, meta.num_experts), slot, gone, gone_layer))
    return accesses, prefetches, replayer.finish()


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # affinity with prior 0
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    experts=st.integers(2, 8),
    top_k=st.integers(1, 3),
    extra=st.integers(0, 10),
    prompt=st.integers(0, 4),
    warm=st.booleans(),
    kind=st.sampled_from(["uniform", "profile", "shared"]),
    prefill=st.sampled_from(["chunked", "bypass"]),
)
def test_kernel_replay_decides_as_route_per_event(seed, experts, top_k, extra, prompt, warm, kind, prefill):
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
        steps = int(rng.integers(1, 25))
        decode = rows(steps)
        decode[rng.random(decode.shape[:2]) < 0.1] = -1  # absent cells
        lookahead = rng.normal(size=(steps, layers, experts)).astype(np.float32)
        lookahead[:, -1] = np.nan  # no next layer
        lookahead[:, 0, :2] = 0.0  # ties: the stable order decides
        sequences.append(SequenceTrace(decode.astype(np.int16), lookahead_logits=lookahead,
                                       prefill_experts=rows(prompt).astype(np.int16) if prompt else None))  # fmt: skip
    meta = TraceMeta("toy", layers, experts, top_k, "test", expert_bytes=1_000_000_000)
    if kind == "shared":
        allocation = Allocation.one_pool(layers, experts, min(top_k + extra, layers * experts))
    elif kind == "profile":
        slots = [min(top_k + int(rng.integers(0, extra + 1)), experts) for _ in range(layers)]
        allocation = Allocation.per_layer("profile", experts, slots)
    else:
        allocation = Allocation.uniform(layers, experts, min(top_k + extra, experts))
    for evict in [*EVICTION, PythonLRU]:
        if kind == "shared" and evict in PER_LAYER_ONLY:
            continue
        for prefetch in PREFETCH:
            label = (evict if isinstance(evict, str) else evict.name, prefetch)

            def build(evict=evict, prefetch=prefetch):
                return build_policy(evict if isinstance(evict, str) else evict(), prefetch)

            general = _general(meta, sequences, _python_twin(build()), allocation, warm, prefill)
            kernel = _kernel(meta, sequences, build(), allocation, warm, prefill)
            assert kernel[0] == general[0], label
            assert kernel[1] == general[1], label
            expected, got = general[2].as_dict(), kernel[2].as_dict()
            for name, value in expected.items():
                assert got[name] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), (
                    label, name)  # fmt: skip


def test_python_hooks_route_per_event():
    meta = TraceMeta("toy", 2, 4, 1, "test", expert_bytes=1)
    class NextExpert(Policy):  # a prefetcher of the plug-in's own: its prefetch runs in Python per event
        prefetch_only = True
        name = "next-expert"

        def prefetch(self, event, cache):
            return [((event.layer + 1) % 2, (event.experts[0] + 1) % 4)]

    class CountingLRU(Policy):  # an observe of the plug-in's own: routed per event
        name = "counting-lru"

        def observe(self, event, cache):
            self.seen = getattr(self, "seen", 0) + 1

    for spec in [("lru", NextExpert()), (CountingLRU(), None)]:
        replayer = Replayer(meta, build_policy(*spec), 2, COST)
        assert not replayer.cache.routes_in_kernel, spec
        with pytest.raises(ValueError, match="route each event"):
            kernel_replay(replayer, [SequenceTrace(np.zeros((1, 2, 1), dtype=np.int16))])


def test_lru_kernel_on_a_list_of_events():
    flags = bytearray()
    # two slots: [0, 1] miss miss; [2] evicts 0; [0] evicts 1 (the least recent); [2] hit
    assert lru_kernel([[0, 1], [2], [0], [2]], 2, 3, flags) == 2
    assert list(flags) == [0, 0, 0, 0, 1]


def test_affinitys_row_sums_are_numpys_bit_for_bit():
    from moe_env.cache_kernel import _pairwise_sum

    rng = np.random.default_rng(0)
    for n in [*range(1, 140), 255, 256, 300, 1000]:  # below 8, the 8-accumulator blocks, the split halves
        row = rng.random(n) * rng.integers(1, 10**6, size=n)
        assert _pairwise_sum(row, n) == row.sum(), n
