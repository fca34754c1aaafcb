"""The live env as one request stream (``warm=True``): its counters are the simulator's ``--warm`` counters on a
trace of the same prompts, the cache really survives between episodes, and the tokens stay the unmodified model's
under random actions."""

import numpy as np
import pytest
import torch

from moe_env.commands.record import record_trace
from moe_env.engine import EngineConfig, OffloadEngine, greedy_decode
from moe_env.env import LiveMoEOffloadEnv
from moe_env.prompts import Prompt
from moe_env.sim import simulate

PROMPTS = [[3, 17, 99, 5, 42, 7, 1, 64, 12, 88], [5, 42, 7, 1, 9], [12, 88, 3, 17, 99, 60, 61]]
NEW_TOKENS = 6
SLOTS = 3


def _run(env: LiveMoEOffloadEnv, choose, episodes: int) -> list[dict]:
    """`episodes` episodes in the env's own order (a warm env: the prompts in turn); the final info of each."""
    infos = []
    for episode in range(episodes):
        env.reset(seed=episode)
        done, info = False, {}
        while not done:
            _, _, done, _, info = env.step(choose())
        infos.append(info)
    return infos


@pytest.fixture
def trace(tiny_models):
    """The routings of the three prompts (a cold LRU engine: routing does not depend on the cache)."""
    with OffloadEngine.from_model(tiny_models("mixtral"), EngineConfig(cache_slots=SLOTS, policy="lru")) as engine:
        prompts = [Prompt(str(i), ids, "eval") for i, ids in enumerate(PROMPTS)]
        return record_trace(engine, prompts, NEW_TOKENS, model_name="tiny")


def test_warm_live_env_with_a_constant_action_counts_as_the_simulator_warm(tiny_models, trace):
    env = LiveMoEOffloadEnv(model=tiny_models("mixtral"), prompts=PROMPTS, max_new_tokens=NEW_TOKENS,
                            capacity=SLOTS, warm=True)  # fmt: skip
    zeros = np.zeros(env.action_space.shape, dtype=np.float32)  # all tied, no prefetch: LRU's decisions
    try:
        infos = _run(env, lambda: zeros, len(PROMPTS))
    finally:
        env.close()
    warm = simulate(trace, "lru", SLOTS, warm=True)
    cold = simulate(trace, "lru", SLOTS)
    assert sum(i["hits"] for i in infos) == warm.hits and sum(i["misses"] for i in infos) == warm.misses
    for info in infos:  # the lockstep replay keeps the engine's per-request counters
        assert (info["hits"], info["misses"]) == (info["engine"].hits, info["engine"].misses)
    assert sum(i["engine"].prefill_hits for i in infos) == warm.prefill_hits
    assert warm.prefill_hits > cold.prefill_hits  # not cold replays: the cache did survive between requests


def test_warm_live_env_wraps_around_cold_and_an_explicit_prompt_stays_warm(tiny_models):
    env = LiveMoEOffloadEnv(model=tiny_models("mixtral"), prompts=PROMPTS[:2], max_new_tokens=NEW_TOKENS,
                            capacity=SLOTS, warm=True)  # fmt: skip
    zeros = np.zeros(env.action_space.shape, dtype=np.float32)
    try:
        first, second, again, _ = _run(env, lambda: zeros, 4)  # prompts 0, 1, then 0 (cold again), 1
        assert env.prompt_index == 1
        assert second["engine"].prefill_hits > 0  # warm: the second request's prefill found experts resident
        for key in ("hits", "misses"):  # the wrap starts the stream cold: the first request once more
            assert again[key] == first[key] and again["engine"].prefill_hits == first["engine"].prefill_hits == 0
        env.reset(options={"prompt": 1})  # prompt 1 again, right after itself: the stream goes on warm
        done, info = False, {}
        while not done:
            _, _, done, _, info = env.step(zeros)
        assert info["engine"].prefill_hits > 0  # a cold prefill never hits: each expert of its union comes once
    finally:
        env.close()


@pytest.mark.parametrize(("budget", "prefill"), [(None, "chunked"), ("0.375", "bypass")])
def test_warm_live_env_decodes_the_unmodified_models_tokens_under_random_actions(tiny_models, budget, prefill):
    expected = [greedy_decode(tiny_models("mixtral"), ids, NEW_TOKENS, torch.device("cpu"))[0] for ids in PROMPTS]
    options = {"capacity": SLOTS} if budget is None else {"budget": budget}
    env = LiveMoEOffloadEnv(model=tiny_models("mixtral"), prompts=PROMPTS, max_new_tokens=NEW_TOKENS, warm=True,
                            prefill=prefill, **options)  # fmt: skip
    env.action_space.seed(0)
    try:
        infos = _run(env, env.action_space.sample, 2 * len(PROMPTS))  # twice through the stream
    finally:
        env.close()
    assert [i["token_ids"] for i in infos] == expected + expected
    for info in infos:
        assert (info["hits"], info["misses"]) == (info["engine"].hits, info["engine"].misses)
