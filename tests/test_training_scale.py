"""PPO at scale: rollouts from env worker processes equal in-process rollouts; the Ray Tune sweep end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moe_env.agents.ppo import PPOConfig
from moe_env.agents.ppo_train import train_ppo
from moe_env.agents.tune import TuneConfig, load_tune_config
from script_modules import load_script
from stable_baselines3 import PPO
from test_env import synthetic_trace

from moe_env.errors import UsageError
from moe_env.trace import Trace, save_trace

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_steps": 32, "batch_size": 32, "n_epochs": 1, "net_arch": [16], "prior": "features"}


def _script():
    return load_script("train/ppo.py")


def test_subprocess_env_workers_train_exactly_as_in_process(tmp_path):
    trace = synthetic_trace()
    train, validation = Trace(trace.meta, trace.sequences[:2]), Trace(trace.meta, trace.sequences[2:])
    weights = {}
    for vec_env in ("dummy", "subproc"):
        config = PPOConfig(total_timesteps=128, n_envs=2, vec_env=vec_env, eval_every=128, **SMALL)
        train_ppo(config, train, validation, tmp_path / vec_env, log=lambda _: None)
        weights[vec_env] = PPO.load(tmp_path / vec_env / "checkpoints" / "last.zip").policy.state_dict()
    assert weights["dummy"].keys() == weights["subproc"].keys()
    for name, value in weights["dummy"].items():
        assert torch.equal(value, weights["subproc"][name]), name


def test_tune_config_is_validated(tmp_path):
    with pytest.raises(UsageError, match="not a PPO config field"):
        TuneConfig(search_space={"learning_rat": {"uniform": [0.1, 0.2]}})
    with pytest.raises(UsageError, match="constant or one of"):
        TuneConfig(search_space={"learning_rate": {"normal": [0.1, 0.2]}})
    with pytest.raises(UsageError, match="grace_timesteps"):
        TuneConfig(max_timesteps=100, grace_timesteps=200)
    (tmp_path / "t.json").write_text('{"num_sample": 3}')
    with pytest.raises(UsageError, match="keys among"):
        load_tune_config(tmp_path / "t.json")
    assert load_tune_config(ROOT / "train" / "configs" / "tune-ppo.json").num_samples >= 2


def test_bad_tune_config_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "t.json").write_text("{not json")
    assert _script().main(["--tune", str(tmp_path / "t.json"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read tune config" in err[0]


def test_tune_sweep_end_to_end(tmp_path, capsys):
    pytest.importorskip("ray.tune")
    trace_file = save_trace(synthetic_trace(sequences=8, steps=12), tmp_path / "t.npz")
    (tmp_path / "ppo.json").write_text(json.dumps({"n_envs": 1, **SMALL}))
    space = {"learning_rate": {"loguniform": [1e-4, 1e-3]}, "residual_scale": {"choice": [0.5, 1]}}
    sweep = {"num_samples": 3, "max_timesteps": 128, "grace_timesteps": 64, "eval_every": 64, "workers": 2,
             "search_space": space}  # fmt: skip
    (tmp_path / "tune.json").write_text(json.dumps(sweep))
    # training (with its validation) and evaluation on disjoint sequences: the script refuses overlaps
    args = ["--traces", f"{trace_file}#0-5", "--eval-traces", f"{trace_file}#6-7",
            "--config", str(tmp_path / "ppo.json"),
            "--tune", str(tmp_path / "tune.json"), "--run-dir", str(tmp_path / "run"), "--json"]  # fmt: skip
    assert _script().main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["trials"]) == 3
    stalls = [t["stall_s_per_token"] for t in out["trials"]]
    assert stalls == sorted(stalls) and out["best"] == out["trials"][0]
    assert Path(out["best"]["trial_dir"], "best-policy.pt").is_file()
    best_config = json.loads((tmp_path / "run" / "best-config.json").read_text())
    assert best_config["learning_rate"] == out["best"]["params"]["learning_rate"]
    assert 1e-4 <= best_config["learning_rate"] <= 1e-3 and best_config["total_timesteps"] == 128
