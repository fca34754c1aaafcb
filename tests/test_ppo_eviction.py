"""The shape-agnostic eviction PPO: its env (check_env, exact replays of LRU and Belady, rewards), its start from
the imitation scorer (same decisions untrained), the shipped plug-in on three shapes, and train/ppo.py end to end
with resume on a tiny trace."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from moe_env.agents.checkpoint import load_checkpoint
from moe_env.agents.eviction_env import ENV_ID, EvictionDecisionEnv
from moe_env.agents.imitation import ImitationPolicy, load_scorer_net, shipped_imitation_path
from moe_env.agents.ppo import PPOPolicy, ResidualPPOPolicy, save_eviction_ppo, shipped_ppo_path
from moe_env.agents.ppo_scorer import SetScorerPolicy
from moe_env.agents.set_scorer import NumpyScorer
from script_modules import load_script
from stable_baselines3 import PPO
from test_env import synthetic_trace

from moe_env.env import MoEOffloadEnv
from moe_env.errors import InvalidArgument, UsageError
from moe_env.policy import make_policy
from moe_env.sim import simulate
from moe_env.trace import Trace, save_trace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trace() -> Trace:
    return synthetic_trace(sequences=3, steps=20, layers=3, experts=8, top_k=2)


def _drive(env: EvictionDecisionEnv, choose, sequence: int, capacity: int) -> dict:
    env.reset(options={"sequence": sequence, "capacity": capacity})
    done, info = False, {}
    while not done:
        _, _, done, _, info = env.step(choose(env))
    return info


def _lru(env: EvictionDecisionEnv) -> int:
    d = env.current_decision
    return int(np.argmin(env.cache.last_use(d.layer)[d.candidates]))


def _belady(env: EvictionDecisionEnv) -> int:
    d = env.current_decision
    far = [env.cache.next_use(d.layer, e) for e in d.candidates]
    last = env.cache.last_use(d.layer)[d.candidates]
    return min(range(len(far)), key=lambda i: (-far[i], last[i], d.candidates[i]))


def test_env_passes_check_env_and_is_registered(trace):
    env = EvictionDecisionEnv(trace, capacities=[3, 4], tables=None)
    check_env(env, skip_render_check=True)
    made = gym.make(ENV_ID, trace=trace, capacities=[3], tables=None)
    obs, _ = made.reset(seed=0)
    assert obs.shape == made.observation_space.shape and obs[:, -1].sum() >= 2  # at least two real candidates
    assert "OBSERVATION" in EvictionDecisionEnv.__doc__ and "REWARD" in EvictionDecisionEnv.__doc__


@pytest.mark.parametrize(("choose", "name"), [(_lru, "lru"), (_belady, "belady")])
def test_env_replays_heuristics_exactly(trace, choose, name):
    """Choosing LRU's (Belady's) victim at every decision gives exactly the simulator's LRU (Belady) hits."""
    env = EvictionDecisionEnv(trace, capacities=[3, 5], tables=None)
    for capacity in (3, 5):
        for i in range(len(trace.sequences)):
            info = _drive(env, choose, i, capacity)
            one = Trace(trace.meta, [trace.sequences[i]])
            assert info["hit_rate"] == simulate(one, name, capacity).hit_rate
            assert info["gap_captured"] == (0.0 if name == "lru" else 1.0)


def test_belady_reward_is_zero_for_the_optimum_and_negative_for_a_worse_choice(trace):
    env = EvictionDecisionEnv(trace, capacities=[3], reward="belady", tables=None)
    env.reset(options={"sequence": 0, "capacity": 3})
    worse = []
    done = False
    while not done:
        best = _belady(env)
        d = env.current_decision
        far = np.array([env.cache.next_use(d.layer, e) for e in d.candidates])
        nearest = int(np.argmin(far))
        if far[nearest] < far.max():
            _, reward, done, _, _ = env.step(nearest)
            worse.append(reward)
        else:
            _, reward, done, _, _ = env.step(best)
            assert reward == 0.0
    assert worse and all(-1.0 <= r < 0.0 for r in worse)


def test_regret_reward_is_zero_for_belady_and_minus_one_for_a_victim_needed_before_belady_s(trace):
    env = EvictionDecisionEnv(trace, capacities=[3], reward="regret", tables=None)
    env.reset(options={"sequence": 0, "capacity": 3})
    worse, done, step = [], False, 0
    while not done:
        d = env.current_decision
        far = np.minimum([env.cache.next_use(d.layer, e) for e in d.candidates], env.horizon)
        nearest = int(np.argmin(far))
        if step % 2 == 0 and far[nearest] < far.max():
            _, reward, done, _, _ = env.step(nearest)
            worse.append(reward)
        else:  # any candidate as far as Belady's victim is as good as Belady's choice
            ties = np.flatnonzero(far == far.max())
            _, reward, done, _, _ = env.step(int(ties[-1]))
            assert reward == 0.0
        step += 1
    assert worse and all(r == -1.0 for r in worse)


def test_misses_reward_sums_to_the_episode_misses(trace):
    env = EvictionDecisionEnv(trace, capacities=[3], reward="misses", tables=None)
    env.reset(options={"sequence": 1, "capacity": 3})
    before = env.misses  # routed before the first decision
    total, done, info = 0.0, False, {}
    while not done:
        _, reward, done, _, info = env.step(0)
        total += reward
    assert total == -(info["misses"] - before) < 0


def test_env_refuses_actions_outside_its_space(trace):
    env = EvictionDecisionEnv(trace, capacities=[3], tables=None)
    env.reset(seed=0)
    for bad in (-1, env.max_candidates, 1.5, [0, 1]):
        with pytest.raises(InvalidArgument):
            env.step(bad)


def _untrained_ppo(env: EvictionDecisionEnv) -> PPO:
    net = load_scorer_net(load_checkpoint(shipped_imitation_path(), "imitation"), "imitation")
    hidden = net.body[0].out_features  # the shipped scorer's width
    model = PPO(SetScorerPolicy, env, n_steps=64, batch_size=32, device="cpu", policy_kwargs={"hidden": hidden}, seed=0)
    model.policy.scorer.load_state_dict(net.state_dict())
    return model


def test_untrained_ppo_decides_as_the_imitation_policy(trace, tmp_path):
    """The actor starts as the imitation scorer: in the env its argmax is the scorer's lowest score at every
    decision, and saved as a plug-in it replays exactly as the imitation plug-in."""
    env = EvictionDecisionEnv(trace, capacities=[3], tables=None)
    model = _untrained_ppo(env)
    scorer = NumpyScorer(model.policy.scorer)
    obs, _ = env.reset(seed=0)
    for _ in range(200):
        action, _ = model.predict(obs, deterministic=True)
        assert int(action) == int(np.argmin(scorer(env.current_decision.rows)))
        obs, _, done, _, _ = env.step(action)
        if done:
            obs, _ = env.reset()
    path = save_eviction_ppo(model.policy.scorer, {"needs": []}, tmp_path / "ppo.pt")
    for capacity in (3, 5):
        imitation = simulate(trace, ImitationPolicy(tables="none"), capacity)
        ppo = simulate(trace, PPOPolicy(path, tables="none"), capacity)
        assert (ppo.hits, ppo.misses, ppo.evictions) == (imitation.hits, imitation.misses, imitation.evictions)


def test_one_ppo_step_changes_the_scorer_only_through_training(trace):
    env = EvictionDecisionEnv(trace, capacities=[3], tables=None)
    model = _untrained_ppo(env)
    before = {k: v.clone() for k, v in model.policy.scorer.state_dict().items()}
    model.learn(64)
    after = model.policy.scorer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("body."))


@pytest.mark.parametrize(("layers", "experts", "top_k"), [(3, 8, 2), (4, 16, 4), (2, 12, 3)])
def test_shipped_ppo_runs_on_any_shape(layers, experts, top_k):
    assert shipped_ppo_path().is_file() and shipped_ppo_path().with_suffix(".json").is_file()
    trace = synthetic_trace(sequences=2, steps=12, layers=layers, experts=experts, top_k=top_k)
    for capacity in (top_k + 1, experts // 2):
        result = simulate(trace, make_policy("ppo"), capacity)
        assert 0.0 < result.hit_rate < 1.0 and result.evictions > 0


def test_a_residual_checkpoint_by_path_builds_the_residual_policy(tmp_path):
    from moe_env.agents.ppo import PPOConfig, actor_critic, save_ppo_policy
    from moe_env.agents.prior import ScorePrior

    from moe_env.env import MoEOffloadEnv

    trace = synthetic_trace(sequences=2)
    env = MoEOffloadEnv(trace, capacity=3, reference_metrics=False)
    config = PPOConfig(net_arch=[8], prior="none")
    net = actor_critic(env.observation_space.shape[0], trace.meta.num_experts, config)
    prior = ScorePrior("none", trace.meta.num_layers, trace.meta.num_experts, 3)
    path = save_ppo_policy(net, prior, config, env.model_spec, 3, tmp_path / "residual.pt")
    assert isinstance(make_policy(f"ppo:{path}"), ResidualPPOPolicy)
    assert isinstance(make_policy("ppo"), PPOPolicy)


def _script():
    return load_script("train/ppo.py")


def test_train_script_with_the_default_config_trains_and_resumes(tmp_path, capsys):
    """The default config on a tiny trace of a shape nothing was trained on: runs, writes the run directory,
    TensorBoard and checkpoints, compares with its starting imitation policy; --resume continues the run."""
    trace_file = save_trace(synthetic_trace(sequences=5, steps=16, layers=3, experts=8, top_k=2), tmp_path / "t.npz")
    run_dir = tmp_path / "run"
    args = ["--traces", f"{trace_file}#0-2", "--validation-traces", f"{trace_file}#3", "--eval-traces",
            f"{trace_file}#4", "--total-timesteps", "256", "--run-dir", str(run_dir), "--json"]  # fmt: skip
    config = json.loads((ROOT / "train" / "configs" / "ppo.json").read_text())
    config |= {"n_steps": 64, "batch_size": 64, "n_epochs": 1, "eval_every": 128}
    (tmp_path / "c.json").write_text(json.dumps(config))
    args += ["--config", str(tmp_path / "c.json")]
    assert _script().main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    policies = {r["policy"] for r in rows}
    assert any(p.startswith("ppo:") for p in policies) and any(p.startswith("imitation:") for p in policies)
    assert {r["slots"] for r in rows} == {3, 4}  # the budgets derived from 8 experts
    for name in ("config.json", "command.txt", "best-policy.pt", "latest-policy.pt", "checkpoints/last.zip"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").rglob("events.out.tfevents.*"))
    snapshots = sorted(p.name for p in (run_dir / "policies").glob("step-*.pt"))  # every evaluated policy kept
    assert snapshots[0] == "step-000000000.pt" and len(snapshots) >= 3
    assert isinstance(PPOPolicy(run_dir / "best-policy.pt"), PPOPolicy)
    first = PPO.load(run_dir / "checkpoints" / "last.zip").num_timesteps
    assert _script().main([*args, "--resume", "--total-timesteps", "512"]) == 0
    capsys.readouterr()
    assert PPO.load(run_dir / "checkpoints" / "last.zip").num_timesteps >= 512 > first
    assert len((run_dir / "command.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize("make", [EvictionDecisionEnv, MoEOffloadEnv], ids=["eviction", "replay"])
def test_an_empty_trace_is_refused_in_one_line(make):
    empty = Trace(synthetic_trace().meta, [])
    with pytest.raises(UsageError, match="the trace holds no sequences") as info:
        make(empty)
    assert len(str(info.value).splitlines()) == 1
