"""Training a PPO policy: vectorised envs, TensorBoard metrics, periodic checkpoints, eval, best policy, resume.

A run directory holds: config.json, command.txt, tb/ (TensorBoard: train/hit_rate, train/stall_s,
train/gap_captured per episode; validation/hit_rate, validation/stall_s_per_token, validation/gap_captured;
SB3's losses), checkpoints/ (full SB3 models for --resume; last.zip is the newest), latest-policy.pt,
policies/step-N.pt (each evaluated policy: the learning curve can be re-measured on other prompts) and
best-policy.pt (policy-only, the plug-in format: ``--policy ppo:RUN/best-policy.pt``). Best = lowest stall per
token on the validation traces (moe_env.agents.traces.split_validation): the eval traces are only for the final table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from moe_env.agents.checkpoint import shipped_policy_path
from moe_env.agents.ppo import PPOConfig, ResidualActionWrapper, ResidualPPOPolicy, save_ppo_policy
from moe_env.agents.predictor import PredictorPolicy, copy_ratio
from moe_env.agents.prior import ScorePrior
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from moe_env.env import MoEOffloadEnv, default_capacity
from moe_env.errors import UsageError
from moe_env.sim import cost_model_for, simulate
from moe_env.trace import Trace, TraceMeta

INFO_KEYS = ("hit_rate", "stall_s", "gap_captured")


def resolve_prior(config: PPOConfig, meta: TraceMeta, log: Callable[[str], None]) -> None:
    """Before training: a "predictor" prior without --prior-predictor needs the predictor shipped for this model;
    where none ships, the run uses the "features" prior and says so (and how to train a predictor)."""
    if config.prior != "predictor" or config.prior_predictor:
        if config.prior_predictor and not Path(config.prior_predictor).is_file():
            raise UsageError(f"--prior-predictor {config.prior_predictor}: no such file")
        return
    shipped = shipped_policy_path("predictor", meta.model)
    if not shipped.is_file():
        config.prior = "features"
        log(
            f"note: no predictor ships for model {meta.model or '(unnamed)'}: using the 'features' prior; for a "
            "predictor prior, train one (python train/predictor.py --traces T --out P.pt), then --prior-predictor P.pt"
        )


def build_prior(config: PPOConfig, trace: Trace, capacity: int) -> ScorePrior:
    meta = trace.meta
    if config.prior != "predictor":
        return ScorePrior(config.prior, meta.num_layers, meta.num_experts, capacity, dict(config.prior_config))
    predictor = PredictorPolicy(config.prior_predictor or shipped_policy_path("predictor", meta.model))
    settings = {"threshold": predictor.threshold, "next_weight": predictor.next_weight}
    if predictor.calibrated_ratio != 1.0:
        settings["copy_ratio"] = predictor.calibrated_ratio
    settings |= config.prior_config
    ratio = copy_ratio(cost_model_for(meta, config.profile), meta.top_k)  # as the plug-in's prior will see it
    return ScorePrior("predictor", meta.num_layers, meta.num_experts, capacity, settings, predictor.net, ratio)


class EvalCallback(BaseCallback):
    """Logs episode metrics; every `eval_every` steps saves the policy, evaluates it and checkpoints the model."""

    def __init__(self, run_dir: Path, evaluate: Callable[[Path], dict], save_policy: Callable[[Path], None],
                 eval_every: int, total: int, log: Callable[[str], None],
                 on_eval: Callable[[dict], None] | None = None):  # fmt: skip
        super().__init__()
        self.on_eval = on_eval  # told every validation result (a Ray Tune trial reports it to its scheduler)
        self.run_dir = run_dir
        self.evaluate = evaluate
        self.save_policy = save_policy
        self.eval_every = eval_every
        self.total = total
        self.log = log
        self.best = float("inf")
        self.next_eval = eval_every
        self.started = time.perf_counter()
        self.episodes: dict[str, list[float]] = {k: [] for k in INFO_KEYS}
        best_file = run_dir / "best.json"
        if best_file.is_file():
            self.best = json.loads(best_file.read_text())["stall_s_per_token"]

    def _on_training_start(self) -> None:
        if self.num_timesteps == 0:  # the untrained policy is ~ the prior: the best is never worse than that
            self.checkpoint()
        self.next_eval = (self.num_timesteps // self.eval_every + 1) * self.eval_every

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"], strict=True):
            if done:
                for key in INFO_KEYS:
                    if key in info and np.isfinite(info[key]):
                        self.episodes[key].append(float(info[key]))
        if self.num_timesteps >= self.next_eval:
            self.next_eval += self.eval_every
            self.checkpoint()
        return True

    def _on_rollout_end(self) -> None:
        for key, values in self.episodes.items():
            if values:
                self.logger.record(f"train/{key}", float(np.mean(values[-20:])))

    def checkpoint(self) -> dict:
        latest = self.run_dir / "latest-policy.pt"
        self.save_policy(latest)
        history = self.run_dir / "policies"
        history.mkdir(exist_ok=True)
        shutil.copyfile(latest, history / f"step-{self.num_timesteps:09d}.pt")
        save_model(self.model, self.run_dir)
        metrics = self.evaluate(latest)
        for key, value in metrics.items():
            self.logger.record(f"validation/{key}", value)
        if metrics["stall_s_per_token"] < self.best:
            self.best = metrics["stall_s_per_token"]
            shutil.copyfile(latest, self.run_dir / "best-policy.pt")
            (self.run_dir / "best.json").write_text(json.dumps(metrics | {"timesteps": self.num_timesteps}))
        elapsed = time.perf_counter() - self.started
        train_hit_rate = np.mean(self.episodes["hit_rate"][-20:] or [np.nan])
        self.log(
            f"[{self.num_timesteps}/{self.total}] {elapsed:.0f}s  train hit_rate {train_hit_rate:.3f}  "
            f"validation hit_rate {metrics['hit_rate']:.3f}  "
            f"stall {1e3 * metrics['stall_s_per_token']:.3f} ms/token  gap {metrics['gap_captured']:.2f}"
            f"{'  (best)' if self.best == metrics['stall_s_per_token'] else ''}"
        )
        self.logger.dump(self.num_timesteps)
        if self.on_eval is not None:
            self.on_eval(metrics | {"timesteps": self.num_timesteps})
        return metrics


def save_model(model: PPO, run_dir: Path) -> None:
    """The full SB3 model for --resume: checkpoints/step-N.zip and checkpoints/last.zip (keeps the newest 3).
    Both are written to a temp file and renamed, so a kill leaves the previous checkpoint whole."""
    directory = run_dir / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".*.zip.tmp"):  # left by a run killed while writing
        stale.unlink(missing_ok=True)
    path = directory / f"step-{model.num_timesteps:09d}.zip"
    _atomic(path, model.save)
    _atomic(directory / "last.zip", lambda tmp: shutil.copyfile(path, tmp))
    for old in sorted(directory.glob("step-*.zip"))[:-3]:
        old.unlink()


def make_vec_env(config: PPOConfig, builders: list[Callable[[], gym.Env]]) -> VecEnv:
    """The rollout workers: ``dummy`` steps every env here; ``subproc`` runs one env per process (SB3's
    SubprocVecEnv, forkserver: the builders are pickled), so rollouts use as many cores as envs."""
    if config.vec_env == "dummy":
        return DummyVecEnv(builders)
    if config.vec_env == "subproc":
        return SubprocVecEnv([_single_threaded(build) for build in builders], start_method="forkserver")
    raise UsageError(f"unknown vec_env {config.vec_env!r} in the PPO config; use dummy or subproc")


def _single_threaded(build: Callable[[], gym.Env]) -> Callable[[], gym.Env]:
    def build_in_worker() -> gym.Env:
        torch.set_num_threads(1)  # one core per env worker: the prior's forward must not oversubscribe
        return build()

    return build_in_worker


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resume_checkpoint(run_dir: Path, log: Callable[[str], None]) -> Path:
    """checkpoints/last.zip if it is an intact zip, else the newest intact step-*.zip (with a one-line warning)."""
    directory = run_dir / "checkpoints"
    last = directory / "last.zip"
    if _intact(last):
        return last
    for candidate in sorted(directory.glob("step-*.zip"), reverse=True):
        if _intact(candidate):
            state = "torn" if last.exists() else "missing"
            log(f"warning: {last} is {state}; resuming from {candidate.name}, the newest intact checkpoint")
            return candidate
    raise UsageError(f"--resume: no intact checkpoint in {directory} (start the run again without --resume)")


def _intact(path: Path) -> bool:
    """A zip whose every member reads back with its CRC (what a torn or truncated write breaks)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def train_ppo(config: PPOConfig, train_trace: Trace, validation: Trace, run_dir: Path, resume: bool = False,
              log: Callable[[str], None] = print, on_eval: Callable[[dict], None] | None = None,
              make_replay_env: Callable[..., gym.Env] = MoEOffloadEnv) -> Path:  # fmt: skip
    """Train (or continue) a run; returns the best policy's path. Ctrl-C saves a checkpoint and re-raises.
    ``make_replay_env(trace, **kwargs)`` builds each rollout env (a Ray worker passes Ray's registered creator)."""
    if (train_trace.meta.num_experts, train_trace.meta.num_layers) != (
        validation.meta.num_experts,
        validation.meta.num_layers,
    ):
        raise UsageError("training and validation traces come from models of different shapes")
    torch.set_num_threads(config.torch_threads)
    meta = train_trace.meta
    capacity = default_capacity(meta.num_experts, meta.top_k) if config.capacity is None else config.capacity
    prior = build_prior(config, train_trace, capacity)
    cost = cost_model_for(meta, config.profile)

    def make_env(rank: int):
        def build():
            env = make_replay_env(train_trace, capacity=capacity, reward=config.reward, profile=cost)
            return Monitor(ResidualActionWrapper(env, prior, config.residual_scale), info_keywords=INFO_KEYS)

        return build

    venv = make_vec_env(config, [make_env(i) for i in range(config.n_envs)])
    venv.seed(config.seed)
    if resume:
        model = PPO.load(resume_checkpoint(run_dir, log), env=venv, device="cpu")
        log(f"resuming {run_dir} at {model.num_timesteps} timesteps")
    else:
        model = PPO(
            "MlpPolicy", venv, **config.sb3_kwargs(), device="cpu", verbose=0,
            policy_kwargs=dict(net_arch=dict(pi=list(config.net_arch), vf=list(config.net_arch)),
                               log_std_init=config.log_std_init),
            tensorboard_log=str(run_dir / "tb"),
        )  # fmt: skip
    spec = MoEOffloadEnv(train_trace, capacity=capacity, profile=cost, reference_metrics=False).model_spec
    lru, belady = (simulate(validation, name, capacity, cost).hit_rate for name in ("lru", "belady"))

    def save_policy(path: Path) -> None:
        save_ppo_policy(model.policy, prior, config, spec, capacity, path)

    def evaluate(path: Path) -> dict:
        result = simulate(validation, ResidualPPOPolicy(path), capacity, cost)
        gap = (result.hit_rate - lru) / (belady - lru) if belady > lru else float("nan")
        return {"hit_rate": result.hit_rate, "stall_s_per_token": result.stall_s_per_token, "gap_captured": gap}

    callback = EvalCallback(run_dir, evaluate, save_policy, config.eval_every, config.total_timesteps, log, on_eval)
    return learn_keeping_checkpoints(model, venv, config.total_timesteps, callback, [], resume, run_dir, save_policy,
                                     log)  # fmt: skip


def learn_keeping_checkpoints(model: PPO, venv: VecEnv, total_timesteps: int, callback: EvalCallback,
                              extra_callbacks: list[BaseCallback], resume: bool, run_dir: Path,
                              save_policy: Callable[[Path], None], log: Callable[[str], None]) -> Path:  # fmt: skip
    """Train up to `total_timesteps`; an interrupt saves the model and the policy before it propagates, so a stopped
    run keeps its last checkpoint. Returns the best policy's path."""
    remaining = total_timesteps - model.num_timesteps
    try:
        if remaining > 0:
            callbacks = CallbackList([callback, *extra_callbacks]) if extra_callbacks else callback
            model.learn(remaining, callback=callbacks, reset_num_timesteps=not resume, tb_log_name="ppo")
            callback.checkpoint()
        else:
            log(f"{run_dir} already holds {model.num_timesteps} timesteps: nothing to train")
    except KeyboardInterrupt:
        save_model(model, run_dir)
        save_policy(run_dir / "latest-policy.pt")
        log(f"interrupted at {model.num_timesteps} timesteps: checkpoint saved, continue with --resume")
        raise
    finally:
        venv.close()  # ends SubprocVecEnv workers
    return run_dir / "best-policy.pt"


def write_run_files(run_dir: Path, config: PPOConfig, extra: dict, command: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config) | extra, indent=1) + "\n")
    with (run_dir / "command.txt").open("a") as f:  # a resumed run appends its command
        f.write(command + "\n")
