"""The vectorised replay env gives exactly what a SyncVectorEnv of single envs gives: on both of its paths (lanes as
arrays, lanes as single envs), in-process and over workers, for every env option, with random actions, through
autoresets and seeded resets."""

from __future__ import annotations

from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
from test_env import synthetic_trace

from moe_env import ENV_ID
from moe_env.env import MoEOffloadEnv
from moe_env.errors import InvalidArgument, UsageError
from moe_env.trace import Trace
from moe_env.vector_env import ReplayVectorEnv


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(sequences=4, steps=6)


def _assert_same_infos(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
        assert np.asarray(ours[key]).dtype == np.asarray(value).dtype, key


def _assert_same_step(ours: tuple, theirs: tuple) -> None:
    for a, b in zip(ours[:4], theirs[:4], strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    _assert_same_infos(ours[4], theirs[4])


def _sync(trace: Trace, num_envs: int, **kwargs) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([lambda: MoEOffloadEnv(trace, **kwargs) for _ in range(num_envs)])


def _run_both(vector: gym.vector.VectorEnv, reference: gym.vector.VectorEnv, steps: int, seed, actions=None) -> int:
    obs, info = vector.reset(seed=seed)
    ref_obs, ref_info = reference.reset(seed=seed)
    np.testing.assert_array_equal(obs, ref_obs)
    _assert_same_infos(info, ref_info)
    rng = np.random.default_rng(0)
    episodes = 0
    for _ in range(steps):
        draw = rng.uniform(-1, 1, size=vector.action_space.shape).astype(np.float32)
        chosen = draw if actions is None else actions
        ours, theirs = vector.step(chosen), reference.step(chosen)
        _assert_same_step(ours, theirs)
        assert vector.observation_space.contains(ours[0])
        episodes += int(ours[2].sum())
    return episodes


OPTIONS = {
    "stall_vs_lru": dict(capacity=3, reward="stall_vs_lru"),
    "stall, gap_captured": dict(capacity=3),
    "no reference metrics": dict(capacity=2, reference_metrics=False),
    "budget of 10 slots": dict(budget="10"),
    "all experts fit": dict(capacity=6, reward="stall_vs_lru"),
    "prefill bypass": dict(capacity=2, prefill="bypass"),
    "warm (single envs)": dict(capacity=3, warm=True, reward="stall_vs_lru"),
    "lfu fallback (single envs)": dict(capacity=3, fallback="lfu"),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_lanes_equal_a_sync_vector_env_for_every_option(trace, option):
    kwargs = OPTIONS[option]
    vector = ReplayVectorEnv(num_envs=3, trace=trace, **kwargs)
    assert vector.path == ("envs" if "single envs" in option else "arrays")
    reference = _sync(trace, 3, **kwargs)
    try:
        episodes = _run_both(vector, reference, steps=60, seed=7)  # several episodes per lane: autoreset covered
        assert episodes >= 6
    finally:
        vector.close()
        reference.close()


@pytest.mark.parametrize("path", ["arrays", "envs"])
def test_over_two_workers_too(trace, path):
    kwargs = dict(capacity=3, reward="stall_vs_lru")
    vector = ReplayVectorEnv(num_envs=3, workers=2, path=path, trace=trace, **kwargs)
    assert vector.path == path
    reference = _sync(trace, 3, **kwargs)
    try:
        assert _run_both(vector, reference, steps=40, seed=11) >= 3
    finally:
        vector.close()
        reference.close()


def test_without_lookahead_logits_constant_action_and_reseeding(trace):
    """No lookahead in the trace (its features are zeros); a constant action; resets mid-episode with a seed list,
    a chosen sequence, and no seed (each lane's generator goes on)."""
    bare = Trace(trace.meta, [replace(s, lookahead_logits=None) for s in trace.sequences])
    vector = ReplayVectorEnv(num_envs=4, trace=bare, capacity=3)
    reference = _sync(bare, 4, capacity=3)
    constant = np.full(vector.action_space.shape, 0.25, dtype=np.float32)
    constant[:, ::2] = -0.75
    try:
        _run_both(vector, reference, steps=25, seed=3, actions=constant)
        _run_both(vector, reference, steps=25, seed=[5, 1, 2, 9])
        _run_both(vector, reference, steps=25, seed=None)
        ours, theirs = vector.reset(options={"sequence": 2}), reference.reset(options={"sequence": 2})
        np.testing.assert_array_equal(ours[0], theirs[0])
        for _ in range(20):
            _assert_same_step(vector.step(constant), reference.step(constant))
    finally:
        vector.close()
        reference.close()


def test_vector_checks_determinism_and_fresh_arrays(trace):
    """What gymnasium's env checker asks of a single env, asked of the vector env: same seed, same rollout;
    returned arrays are not reused by the next step; spaces and dtypes hold."""

    def rollout(seed):
        vector = ReplayVectorEnv(num_envs=2, trace=trace, capacity=3)
        obs, _ = vector.reset(seed=seed)
        out = [obs]
        action = np.zeros(vector.action_space.shape, dtype=np.float32)
        for _ in range(25):
            step = vector.step(action)
            out.extend(step[:2])
        vector.close()
        return out

    first, again, other = rollout(4), rollout(4), rollout(5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    vector = ReplayVectorEnv(num_envs=2, trace=trace, capacity=3)
    obs, _ = vector.reset(seed=0)
    kept = obs.copy()
    step = vector.step(np.zeros(vector.action_space.shape, dtype=np.float32))
    np.testing.assert_array_equal(obs, kept)  # the step wrote into its own buffers, not into what reset returned
    assert vector.observation_space.contains(step[0]) and step[1].dtype == np.float64
    assert step[2].dtype == np.bool_ and step[3].dtype == np.bool_
    vector.close()


def test_bad_actions_are_refused_with_a_clear_error(trace):
    vector = ReplayVectorEnv(num_envs=2, trace=trace, capacity=3)
    vector.reset(seed=0)
    bad = np.zeros(vector.action_space.shape, dtype=np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        vector.step(bad)
    with pytest.raises(InvalidArgument, match="shape"):
        vector.step(np.zeros((2, 5), dtype=np.float32))
    for wrong in (bad.astype(str), bad > 0):  # strings and bools are refused, not converted
        with pytest.raises(InvalidArgument, match="real numbers"):
            vector.step(wrong)
    huge = np.zeros(vector.action_space.shape)
    huge[0, 0] = np.inf
    with pytest.raises(InvalidArgument, match="NaN or inf"):
        vector.step(huge)
    with pytest.raises(UsageError, match="one per lane"):
        vector.reset(seed=[1, 2, 3])
    vector.close()


def test_make_vec_uses_the_vector_entry_point(trace):
    vector = gym.make_vec(ENV_ID, num_envs=2, trace=trace, capacity=3)
    try:
        assert isinstance(vector.unwrapped, ReplayVectorEnv)
        assert vector.unwrapped.path == "arrays"
        obs, _ = vector.reset(seed=0)
        assert obs.shape == (2, MoEOffloadEnv.observation_size(vector.unwrapped._local.spec))
    finally:
        vector.close()


def test_bad_vector_arguments_are_refused(trace):
    with pytest.raises(UsageError, match="workers"):
        ReplayVectorEnv(num_envs=2, workers=3, trace=trace)
    with pytest.raises(UsageError, match="replay backend"):
        ReplayVectorEnv(num_envs=2, backend="live", trace=trace)
    with pytest.raises(UsageError, match="path"):
        ReplayVectorEnv(num_envs=2, path="fast", trace=trace)
    with pytest.raises(UsageError, match="path='envs'"):
        ReplayVectorEnv(num_envs=2, path="arrays", warm=True, trace=trace)


def test_gymnasium_vector_wrappers_see_the_same_episodes(trace):
    """gymnasium's own vector wrapper (episode statistics over NEXT_STEP autoresets) on both: identical episodes."""
    from gymnasium.wrappers.vector import RecordEpisodeStatistics

    vector = RecordEpisodeStatistics(ReplayVectorEnv(num_envs=2, trace=trace, capacity=3))
    reference = RecordEpisodeStatistics(_sync(trace, 2, capacity=3))
    seen = []
    try:
        for env in (vector, reference):
            env.reset(seed=2)
            episodes = []
            for _ in range(45):
                *_, info = env.step(np.full(env.action_space.shape, 0.5, dtype=np.float32))
                if "episode" in info:
                    mask = info["_episode"]
                    episodes.append((info["episode"]["r"][mask].tolist(), info["episode"]["l"][mask].tolist()))
            seen.append(episodes)
    finally:
        vector.close()
        reference.close()
    assert len(seen[0]) >= 2 and seen[0] == seen[1]
