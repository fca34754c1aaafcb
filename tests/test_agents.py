"""Learned policies: plug-ins decide as in the env, checkpoints round-trip and are validated, scripts run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from moe_env.agents.checkpoint import load_checkpoint, save_checkpoint, shipped_policy_path
from moe_env.agents.ppo import PPOConfig, PPOPolicy, actor_critic, save_ppo_policy
from moe_env.agents.predictor import PredictorConfig, PredictorPolicy, collect_samples, save_predictor, train_predictor
from moe_env.agents.prior import ScorePrior
from script_modules import load_script
from test_env import synthetic_trace

from moe_env.env import MoEOffloadEnv, rollout
from moe_env.errors import CheckpointError
from moe_env.policy import make_policy
from moe_env.sim import simulate
from moe_env.trace import save_trace

# plug-in names of the checkpoint kinds tested here: the flat (tiny-mixtral only) predictor is "flat-predictor"; the
# shape-agnostic prefetch predictor ("predictor") is tested in tests/test_learned_predictor.py
SPEC = {"predictor": "flat-predictor", "ppo": "ppo"}


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace()


@pytest.fixture(scope="module")
def predictor_path(trace, tmp_path_factory):
    samples = collect_samples(trace, 3, None)
    net = train_predictor(samples, PredictorConfig(epochs=3, hidden=32), log=lambda _: None)
    env = MoEOffloadEnv(trace, capacity=3)
    path = tmp_path_factory.mktemp("pred") / "predictor.pt"
    save_predictor(net, PredictorConfig(hidden=32, threshold=0.3), env.model_spec, 3, path)
    return path


@pytest.fixture(scope="module")
def ppo_path(trace, tmp_path_factory):
    env = MoEOffloadEnv(trace, capacity=3)
    config = PPOConfig(net_arch=[16, 16], prior="features", log_std_init=-1.0)
    torch.manual_seed(0)
    net = actor_critic(env.observation_space.shape[0], 6, config)
    with torch.no_grad():  # make the residual matter: a zero-initialised action head would hide bugs
        net.action_net.weight.normal_(0.0, 0.5)
    prior = ScorePrior("features", 3, 6, 3, {"prefetch_threshold": 0.3})
    path = tmp_path_factory.mktemp("ppo") / "ppo.pt"
    save_ppo_policy(net, prior, config, env.model_spec, 3, path)
    return path


def env_decisions_equal_simulator(trace, policy_spec: str) -> tuple[dict, object]:
    """The plug-in through the simulator vs the same network acting on the env's observations."""
    env = MoEOffloadEnv(trace, capacity=3)
    actor = make_policy(policy_spec)
    actor.reset(env.model_spec, 3)
    hits = misses = 0
    stall = 0.0
    for i in range(len(trace.sequences)):
        info = rollout(env, lambda obs, e: actor.act(obs, e.current_event, e.cache), i)
        hits, misses, stall = hits + info["hits"], misses + info["misses"], stall + info["stall_s"]
    result = simulate(trace, make_policy(policy_spec), 3)
    return {"hits": hits, "misses": misses, "stall_s": stall}, result


@pytest.mark.parametrize("kind", ["predictor", "ppo"])
def test_plugin_decides_as_in_the_env(trace, predictor_path, ppo_path, kind):
    path = predictor_path if kind == "predictor" else ppo_path
    env_side, sim = env_decisions_equal_simulator(trace, f"{SPEC[kind]}:{path}")
    assert (env_side["hits"], env_side["misses"]) == (sim.hits, sim.misses)
    assert env_side["stall_s"] == pytest.approx(sim.stall_s)
    assert sim.prefetch_issued > 0  # the learned scores do prefetch (the test is not vacuous)


def test_ppo_plugin_reproduces_the_sb3_policy(trace, ppo_path):
    policy = PPOPolicy(ppo_path)
    saved = load_checkpoint(ppo_path, "ppo")
    net = actor_critic(saved.obs_size, 6, policy.config)
    net.load_state_dict({k[len("policy.") :]: v for k, v in saved.state_dict.items() if k.startswith("policy.")})
    obs = np.random.default_rng(0).uniform(0, 1, size=(20, saved.obs_size)).astype(np.float32)
    for row in obs:
        sb3_action, _ = net.predict(row, deterministic=True)
        np.testing.assert_allclose(np.clip(policy.residual(row), -1, 1), sb3_action, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["predictor", "ppo"])
def test_save_load_round_trip_gives_identical_decisions(trace, predictor_path, ppo_path, tmp_path, kind):
    path = predictor_path if kind == "predictor" else ppo_path
    copy = tmp_path / "copy.pt"
    save_checkpoint(load_checkpoint(path, kind), copy)
    a, b = (simulate(trace, make_policy(f"{SPEC[kind]}:{p}"), 3) for p in (path, copy))
    assert a.as_dict() | {"policy": ""} == b.as_dict() | {"policy": ""}


def test_corrupt_and_mismatched_checkpoints_are_refused(trace, predictor_path, ppo_path, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        PPOPolicy(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ppo_path.read_bytes()[:500])
    with pytest.raises(CheckpointError):
        PPOPolicy(truncated)
    with pytest.raises(CheckpointError, match="expected 'ppo'"):
        PPOPolicy(predictor_path)
    with pytest.raises(CheckpointError, match="no such"):
        make_policy(f"flat-predictor:{tmp_path / 'missing.pt'}")
    poisoned = load_checkpoint(predictor_path, "predictor")
    next(iter(poisoned.state_dict.values()))[0] = float("nan")
    save_checkpoint(poisoned, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN"):
        PredictorPolicy(tmp_path / "nan.pt")
    wrong_shape = load_checkpoint(predictor_path, "predictor")
    wrong_shape.state_dict["head.weight"] = torch.zeros(3, 3)
    save_checkpoint(wrong_shape, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        PredictorPolicy(tmp_path / "shape.pt")
    bigger = synthetic_trace(experts=8)  # same model name, 8 experts instead of 6
    with pytest.raises(CheckpointError, match="experts"):
        simulate(bigger, make_policy(f"ppo:{ppo_path}"), 3)
    renamed = synthetic_trace()
    renamed.meta.model = "another-model"
    with pytest.raises(CheckpointError, match="another-model"):
        simulate(renamed, make_policy(f"flat-predictor:{predictor_path}"), 3)


def test_cli_reports_a_bad_checkpoint_in_one_line(trace, tmp_path):
    trace_file = save_trace(trace, tmp_path / "t.npz")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_env.cli",
            "bench",
            "--trace",
            str(trace_file),
            "--policies",
            f"ppo:{bad}",
            "--cache-slots",
            "3",
            "--plots",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "checkpoint" in run.stderr


def test_shipped_predictor_loads_for_tiny_mixtral():
    """(The shipped ppo is shape-agnostic: tests/test_ppo_eviction.py runs it on three shapes.)"""
    from moe_env.policy import ModelSpec

    for kind in ("predictor",):
        path = shipped_policy_path(kind)
        assert path.is_file(), f"{path} is not shipped"
        policy = make_policy(SPEC[kind])
        ckpt = load_checkpoint(path, kind)
        m = ckpt.model
        assert m["name"] == "tiny-mixtral"
        policy.reset(ModelSpec(m["num_layers"], m["num_experts"], m["top_k"], 0, "tiny-mixtral"), ckpt.capacity)
        assert path.with_suffix(".json").is_file()


def _script(name: str):
    return load_script(f"train/{name}.py")


def test_train_ppo_script_end_to_end_and_resume(trace, tmp_path, capsys):
    trace_file = save_trace(trace, tmp_path / "t.npz")
    config = {
        "total_timesteps": 256,
        "n_envs": 2,
        "n_steps": 64,
        "batch_size": 64,
        "n_epochs": 1,
        "net_arch": [16],
        "eval_every": 128,
    }
    (tmp_path / "c.json").write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    args = [
        "--traces",
        f"{trace_file}#1,2",
        "--eval-traces",
        f"{trace_file}#0",
        "--config",
        str(tmp_path / "c.json"),
        "--run-dir",
        str(run_dir),
        "--json",
    ]
    assert _script("ppo").main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    learned = [r for r in rows if r["policy"].startswith("ppo:")]
    assert len(learned) == 1 and {"hit_rate", "stall_s_per_token", "gap_captured"} <= learned[0].keys()
    assert {r["policy"] for r in rows} >= {"fifo", "lru", "lfu-decay", "belady"}
    for name in ("config.json", "command.txt", "best-policy.pt", "latest-policy.pt", "checkpoints/last.zip"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").rglob("events.out.tfevents.*"))
    first = json.loads((run_dir / "best.json").read_text())["timesteps"]
    assert _script("ppo").main([*args, "--resume", "--total-timesteps", "512"]) == 0
    capsys.readouterr()
    from stable_baselines3 import PPO

    assert PPO.load(run_dir / "checkpoints" / "last.zip").num_timesteps >= 512 > first


@pytest.mark.parametrize(
    ("kind", "config", "heuristic"),
    [("none", {}, "lru"), ("features", {"decayed": 0, "recency": 0, "lookahead": 0, "prefetch_threshold": 2}, "lfu")],
)
def test_priors_reproduce_their_heuristics(trace, kind, config, heuristic):
    """A PPO policy starts at its prior: the zero prior is LRU, the long-run-frequency prior is LFU."""
    env = MoEOffloadEnv(trace, capacity=3, fallback=heuristic)  # prefill and the first layer: no decision
    prior = ScorePrior(kind, 3, 6, 3, config)
    hits = misses = 0
    for i in range(len(trace.sequences)):
        info = rollout(env, lambda obs, e: prior(obs), i)
        hits, misses = hits + info["hits"], misses + info["misses"]
    result = simulate(trace, heuristic, 3)
    assert (hits, misses) == (result.hits, result.misses)


def test_shipped_policies_beat_lru_on_the_held_out_split():
    """Deterministic quality guard: the shipped files on the shipped eval split (prompts never trained on)."""
    from moe_env.trace import builtin_trace_names, load_trace

    if "tiny-mixtral" not in builtin_trace_names():
        pytest.skip("builtin tiny-mixtral traces not shipped")
    full = load_trace("builtin:tiny-mixtral/eval")
    trace = type(full)(full.meta, full.sequences[:4])  # 4 of the 16 held-out prompts keep CI light
    lru = simulate(trace, "lru", 4)
    for kind in ("predictor", "ppo"):
        learned = simulate(trace, make_policy(SPEC[kind]), 4)
        assert learned.stall_s_per_token < lru.stall_s_per_token
        assert learned.hit_rate > lru.hit_rate


def test_cost_aware_threshold_follows_the_copy_ratio():
    from moe_env.agents.predictor import cost_aware_threshold

    assert cost_aware_threshold(0.4, 1.0) == 0.4  # the calibration regime: unchanged
    assert cost_aware_threshold(0.4, None) == 0.4  # no cost model (the engine): as calibrated
    assert cost_aware_threshold(1.01, 10.0) == 1.01  # "never prefetch" stays never
    moved = [cost_aware_threshold(0.4, r) for r in (1.0, 2.0, 10.0, 100.0)]
    assert moved == sorted(moved) and moved[-1] < 1.0
    assert cost_aware_threshold(0.4, 10.0, calibrated_ratio=10.0) == pytest.approx(0.4)
    odds = 0.4 / 0.6 * 10.0  # break-even odds p / (1 - p) scale with the ratio
    assert cost_aware_threshold(0.4, 10.0) == pytest.approx(odds / (1 + odds))


def test_shipped_predictor_threshold_depends_on_the_profile_not_on_the_driver():
    """The as-recorded profile keeps the calibrated threshold; a link-bound one raises it; explicit ones stay."""
    from moe_env.trace import builtin_trace_names, load_trace

    if "tiny-mixtral" not in builtin_trace_names():
        pytest.skip("builtin tiny-mixtral traces not shipped")
    full = load_trace("builtin:tiny-mixtral/eval")
    trace = type(full)(full.meta, full.sequences[:1])
    thresholds = {}
    for profile in ("consumer-pcie4", "consumer-pcie4:mixtral-8x7b-4bit"):
        for spec in ("flat-predictor", "flat-predictor:threshold=0.4", "flat-predictor:cost_aware=False"):
            policy = make_policy(spec)
            simulate(trace, policy, 4, profile)
            thresholds[profile, spec] = policy.threshold
    base = PredictorPolicy().base_threshold
    assert thresholds["consumer-pcie4", "flat-predictor"] == base
    assert thresholds["consumer-pcie4:mixtral-8x7b-4bit", "flat-predictor"] > base + 0.3
    for profile in ("consumer-pcie4", "consumer-pcie4:mixtral-8x7b-4bit"):
        assert thresholds[profile, "flat-predictor:threshold=0.4"] == 0.4
        assert thresholds[profile, "flat-predictor:cost_aware=False"] == base


def test_cost_aware_predictor_does_not_prefetch_itself_behind_demand_lru_when_link_bound():
    """Deterministic quality guard on 4 held-out prompts: with Mixtral-sized 4-bit experts (a copy ~10 layers of
    compute) the shipped predictor must not stall more than demand-only LRFU; as calibrated it did."""
    from moe_env.trace import builtin_trace_names, load_trace

    if "tiny-mixtral" not in builtin_trace_names():
        pytest.skip("builtin tiny-mixtral traces not shipped")
    full = load_trace("builtin:tiny-mixtral/eval")
    trace = type(full)(full.meta, full.sequences[:4])
    profile = "consumer-pcie4:mixtral-8x7b-4bit"
    lrfu = simulate(trace, "lrfu:lam=0.01", 4, profile)
    aware = simulate(trace, make_policy("flat-predictor"), 4, profile)
    fixed = simulate(trace, make_policy("flat-predictor:cost_aware=False"), 4, profile)
    assert aware.stall_s_per_token < lrfu.stall_s_per_token
    assert aware.stall_s_per_token < fixed.stall_s_per_token


@pytest.mark.parametrize("kind", ["predictor", "ppo"])
def test_cost_aware_plugin_decides_as_in_the_env_under_a_link_bound_profile(trace, predictor_path, ppo_path, kind):
    """Bound to the env's cost model, the plug-in acting on env observations matches the simulator's replay."""
    profile = "consumer-pcie4:mixtral-8x7b-4bit"
    spec = f"{SPEC[kind]}:{predictor_path if kind == 'predictor' else ppo_path}"
    env = MoEOffloadEnv(trace, capacity=3, profile=profile)
    actor = make_policy(spec)
    actor.bind_cost_model(env.cost)
    actor.reset(env.model_spec, 3)
    hits = misses = 0
    for i in range(len(trace.sequences)):
        info = rollout(env, lambda obs, e: actor.act(obs, e.current_event, e.cache), i)
        hits, misses = hits + info["hits"], misses + info["misses"]
    result = simulate(trace, make_policy(spec), 3, profile)
    assert (hits, misses) == (result.hits, result.misses)
