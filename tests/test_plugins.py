"""The policy registry: a third-party package's entry point works without touching the project."""

import sys
import textwrap

import numpy as np
import pytest

from moe_env.policy import PolicySpecError, available_policies, build_policy, make_policy
from moe_env.sim import simulate
from moe_env.trace import SequenceTrace, Trace, TraceMeta

PLUGIN = '''
import numpy as np
from moe_env.policy import Policy


class MostRecentlyUsed(Policy):
    """Evicts the most recently used expert (MRU): easy to tell apart from every built-in."""

    def __init__(self, sign=-1.0):
        self.sign = float(sign)

    def eviction_scores(self, layer, candidates, cache):
        return self.sign * cache.last_use(layer)[candidates].astype(np.float64)
'''


@pytest.fixture
def thirdparty(tmp_path, monkeypatch):
    """A tiny installed distribution: a module plus a *.dist-info with entry_points.txt, found via sys.path."""
    (tmp_path / "thirdparty_mru.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "thirdparty_mru-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-mru\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[moe_env.policies]\nthirdparty = thirdparty_mru:MostRecentlyUsed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("thirdparty_mru", None)


def _trace() -> Trace:
    # one layer, slots 2: 0 1 0 2 0 -> MRU evicts 0 when 2 arrives (just used); LRU evicts 1
    experts = np.asarray([[[0]], [[1]], [[0]], [[2]], [[0]]], dtype=np.int16)
    return Trace(TraceMeta("toy", 1, 4, 1, "test", expert_bytes=1000), [SequenceTrace(experts=experts)])


def test_thirdparty_policy_is_found_and_runs_in_the_simulator(thirdparty):
    assert "thirdparty" in available_policies()
    policy = make_policy("thirdparty:sign=-1")
    assert type(policy).__name__ == "MostRecentlyUsed" and policy.name == "thirdparty:sign=-1"
    mru = simulate(_trace(), "thirdparty", 2, "cpu-nvme")
    lru = simulate(_trace(), "lru", 2, "cpu-nvme")
    assert (mru.hits, lru.hits) == (1, 2)
    assert mru.bytes_moved == 4 * 1000


def test_thirdparty_is_absent_without_its_distribution():
    assert "thirdparty" not in available_policies()
    with pytest.raises(PolicySpecError, match=r"unknown policy 'thirdparty'; known policies: .*belady"):
        make_policy("thirdparty")


@pytest.mark.parametrize(
    "policy, prefetch, fragment",
    [
        ("lookahead", None, "is a prefetcher"),
        ("lfu-decay:rate=3", None, "bad arguments for policy 'lfu-decay'"),
        ("lru:", None, None),
    ],
)
def test_spec_errors(policy, prefetch, fragment):
    if fragment is None:
        build_policy(policy, prefetch)  # accepted
        return
    with pytest.raises(PolicySpecError, match=fragment):
        build_policy(policy, prefetch)
