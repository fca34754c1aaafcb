"""The vectorised replay env gives exactly what a SyncVectorEnv of single envs gives, in-process and over workers."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from test_env import synthetic_trace

from moe_env import ENV_ID
from moe_env.env import MoEOffloadEnv
from moe_env.errors import UsageError
from moe_env.vector_env import ReplayVectorEnv


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(sequences=4, steps=6)


def _assert_same_infos(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def _run_both(vector: gym.vector.VectorEnv, reference: gym.vector.VectorEnv, steps: int, seed: int) -> int:
    obs, info = vector.reset(seed=seed)
    ref_obs, ref_info = reference.reset(seed=seed)
    np.testing.assert_array_equal(obs, ref_obs)
    _assert_same_infos(info, ref_info)
    rng = np.random.default_rng(seed)
    episodes = 0
    for _ in range(steps):
        actions = rng.uniform(-1, 1, size=vector.action_space.shape).astype(np.float32)
        ours, theirs = vector.step(actions), reference.step(actions)
        for a, b in zip(ours[:4], theirs[:4], strict=True):
            np.testing.assert_array_equal(a, b)
        _assert_same_infos(ours[4], theirs[4])
        episodes += int(ours[2].sum())
    return episodes


@pytest.mark.parametrize("workers", [1, 2])
def test_lanes_equal_a_sync_vector_env_of_single_envs(trace, workers):
    vector = ReplayVectorEnv(num_envs=3, workers=workers, trace=trace, capacity=3, reward="stall_vs_lru")
    reference = gym.vector.SyncVectorEnv(
        [lambda: MoEOffloadEnv(trace, capacity=3, reward="stall_vs_lru") for _ in range(3)]
    )
    try:
        episodes = _run_both(vector, reference, steps=60, seed=7)  # several episodes per lane: autoreset covered
        assert episodes >= 6
    finally:
        vector.close()
        reference.close()


def test_make_vec_uses_the_vector_entry_point(trace):
    vector = gym.make_vec(ENV_ID, num_envs=2, trace=trace, capacity=3)
    try:
        assert isinstance(vector.unwrapped, ReplayVectorEnv)
        obs, _ = vector.reset(seed=0)
        assert vector.unwrapped.path == "arrays"
        assert obs.shape == (2, MoEOffloadEnv.observation_size(vector.unwrapped._local.spec))
    finally:
        vector.close()


def test_bad_vector_arguments_are_refused(trace):
    with pytest.raises(UsageError, match="workers"):
        ReplayVectorEnv(num_envs=2, workers=3, trace=trace)
    with pytest.raises(UsageError, match="replay backend"):
        ReplayVectorEnv(num_envs=2, backend="live", trace=trace)
