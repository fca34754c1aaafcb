"""The live env (the Gymnasium env over the real decode loop) under a cache budget and an allocation: the tokens
are the unmodified model's, the lockstep replay keeps the engine's counters, and bad options fail in one line
before the model loads."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import PROMPT_IDS

import moe_env
from moe_env.engine import greedy_decode
from moe_env.env import LiveMoEOffloadEnv
from moe_env.errors import UsageError
from moe_env.models import adapter_for
from moe_env.trace import SequenceTrace, Trace, TraceMeta, save_trace

NEW_TOKENS = 8


@pytest.fixture
def profile_trace(tmp_path, tiny_models):
    """A training trace of the tiny Mixtral's shape, skewed per layer (so the profile layout is not uniform)."""
    adapter = adapter_for(tiny_models("mixtral"))
    layers, experts, top_k = len(adapter.layers), adapter.num_experts, adapter.top_k
    rng = np.random.default_rng(1)
    skew = rng.dirichlet(np.full(experts, 0.3), size=layers)
    rows = [[rng.choice(experts, top_k, replace=False, p=skew[layer]) for layer in range(layers)] for _ in range(40)]
    meta = TraceMeta("tiny", layers, experts, top_k, "test")
    return str(save_trace(Trace(meta, [SequenceTrace(np.asarray(rows, dtype=np.int16))]), tmp_path / "train.npz"))


def _episode(env: LiveMoEOffloadEnv, seed: int) -> dict:
    env.action_space.seed(seed)
    env.reset(seed=seed)
    done, info = False, {}
    while not done:
        _, _, done, _, info = env.step(env.action_space.sample())
    return info


@pytest.mark.parametrize(
    ("budget", "allocation", "prefill"),
    [("0.375", "uniform", "chunked"), ("9", "profile", "bypass"), ("5", "profile", "chunked")],
)
def test_live_env_under_a_budget_decodes_the_unmodified_models_tokens(
    tiny_models, profile_trace, budget, allocation, prefill
):
    expected, _, _, _ = greedy_decode(tiny_models("mixtral"), PROMPT_IDS, NEW_TOKENS, torch.device("cpu"))
    if allocation == "profile":
        allocation = f"profile:{profile_trace}"
    env = LiveMoEOffloadEnv(model=tiny_models("mixtral"), prompts=[PROMPT_IDS], max_new_tokens=NEW_TOKENS,
                            budget=budget, allocation=allocation, prefill=prefill)  # fmt: skip
    try:
        layout = env.cache.allocation
        spec = env.model_spec
        assert layout.total_slots <= max(int(float(budget) * spec.num_layers * spec.num_experts), int(float(budget)))
        assert env.shadow.cache.allocation == layout  # the reward's replay runs the same layout
        for seed in (0, 1):  # random actions: prefetches and evictions the heuristics would not make
            info = _episode(env, seed)
            assert info["token_ids"] == expected
            assert (info["hits"], info["misses"]) == (info["engine"].hits, info["engine"].misses)
            if prefill == "bypass" and info["engine"].prefill_hits + info["engine"].prefill_misses > layout.total_slots:
                assert info["engine"].bypass_loads > 0
    finally:
        env.close()


def test_live_env_budget_in_bytes_sets_the_total_slots(tiny_models):
    spec_bytes = adapter_for(tiny_models("mixtral")).shape.nbytes
    env = LiveMoEOffloadEnv(model=tiny_models("mixtral"), prompts=[PROMPT_IDS], max_new_tokens=4,
                            budget=f"{12 * spec_bytes + spec_bytes // 2}B")  # fmt: skip
    try:
        assert env.cache.allocation.total_slots == 12  # floored to whole experts
        assert env.capacity == 12 // env.model_spec.num_layers
    finally:
        env.close()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"budget": "6 parsecs"}, "cannot read cache budget '6 parsecs'"),
        ({"budget": "0"}, "at least one slot"),
        ({"budget": "1.5"}, "a fraction must lie in (0, 1]"),
        ({"budget": "8", "capacity": 4}, "a capacity (slots per layer) or a budget, not both"),
        ({"allocation": "diagonal"}, "unknown cache allocation 'diagonal'"),
        ({"prefill": "eager"}, "unknown prefill mode 'eager'"),
        ({"budget": "2"}, "each layer needs top-k=2"),
        ({"budget": "16", "allocation": "shared"}, "does not rank victims across layers"),
    ],
)
def test_live_env_refuses_a_bad_budget_in_one_line(tiny_models, options, fragment):
    with pytest.raises(UsageError) as raised:
        gym.make(moe_env.ENV_ID, backend="live", model=tiny_models("mixtral"), prompts=[PROMPT_IDS], **options)
    message = str(raised.value)
    assert fragment in message and "\n" not in message
