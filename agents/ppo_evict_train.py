"""Training the shape-agnostic eviction PPO: SB3 PPO on the eviction-decision env, starting from imitation.

The actor is the imitation set scorer (agents/ppo_scorer.py), initialised from an imitation checkpoint (the
shipped one by default), so the untrained policy IS the imitation policy and every later checkpoint is measured
against it. The run directory is train/ppo.py's (agents/ppo_train.py): config.json, command.txt, tb/ (TensorBoard:
train/hit_rate, train/gap_captured per episode, validation/*, SB3's losses), checkpoints/ (full SB3 models for
--resume), latest-policy.pt and best-policy.pt (plug-in format: ``--policy ppo:RUN/best-policy.pt``). Best =
lowest validation stall per token, mean over the run's capacities; the step-0 checkpoint (= the starting policy) is
evaluated first, so the best is never worse than the start on validation.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moe_env.agents.checkpoint import load_checkpoint
from moe_env.agents.configs import PPOHyperparameters
from moe_env.agents.eviction_env import REWARDS, EvictionDecisionEnv, default_capacities
from moe_env.agents.imitation import load_scorer_net, shipped_imitation_path
from moe_env.agents.ppo import KIND, PPOPolicy, save_eviction_ppo
from moe_env.agents.ppo_scorer import SetScorerPolicy
from moe_env.agents.ppo_train import EvalCallback, learn_keeping_checkpoints, make_vec_env, resume_checkpoint
from moe_env.agents.set_scorer import SetScorerNet
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from tqdm import tqdm

from moe_env.errors import CheckpointError, UsageError
from moe_env.sim import cost_model_for, simulate
from moe_env.trace import Trace

MODE = "evict"
INFO_KEYS = ("hit_rate", "gap_captured")


@dataclass
class EvictionPPOConfig(PPOHyperparameters):
    """train/configs/ppo.json holds these fields and PPOHyperparameters' (``mode: "evict"``); None = derived from
    the trace. The SB3 defaults differ from the residual PPO's: short-horizon credit (one eviction's outcome) and
    small steps from a trained start."""

    mode: str = MODE
    total_timesteps: int = 60_000
    n_envs: int = 2
    n_steps: int = 1024
    n_epochs: int = 4
    learning_rate: float = 1e-4
    gamma: float = 0.5
    clip_range: float = 0.1
    eval_every: int = 10_000
    value_hidden: int = 32
    reward: str = "belady"  # belady | regret | misses (agents/eviction_env.py)
    horizon_tokens: float = 64.0
    capacities: list[int] | None = None  # None: 1/8, 1/4, 1/2 of the experts
    max_candidates: int | None = None  # None: the largest capacity
    start: str = ""  # imitation (or eviction-PPO) checkpoint the actor starts from; "" = the shipped imitation
    tables: str = "shipped"  # model tables of the features: shipped (by shape) | none | a tables path
    validation_sequences: int | None = None  # None: every validation sequence (evaluate fewer to save time)


def check_config(config: EvictionPPOConfig) -> None:
    """The choices a config makes by name, refused before any work with one line."""
    if config.reward not in REWARDS:
        raise UsageError(f"unknown reward {config.reward!r} for the eviction PPO; use {', '.join(REWARDS)}")
    if config.vec_env not in ("dummy", "subproc"):
        raise UsageError(f"unknown vec_env {config.vec_env!r} in the PPO config; use dummy or subproc")
    if config.tables.lower() not in ("shipped", "none") and not Path(config.tables).is_file():
        raise UsageError(f"tables {config.tables}: no such file (use shipped, none or a tables .npz)")
    if config.max_candidates is not None and config.max_candidates < 2:
        raise UsageError(f"max_candidates must be at least 2, got {config.max_candidates}")


def start_checkpoint(config: EvictionPPOConfig) -> tuple[Path, SetScorerNet, list[str]]:
    """(path, scorer, needed signals) of the starting policy; refused with one line if unusable."""
    path = Path(config.start) if config.start else shipped_imitation_path()
    if not path.is_file():
        raise UsageError(f"--start {path}: no such file (give an imitation checkpoint: python train/imitation.py)")
    try:
        ckpt = load_checkpoint(path, "imitation")
    except CheckpointError:
        ckpt = load_checkpoint(path, KIND)  # an eviction PPO continues from its own weights
        if ckpt.config.get("decision") != MODE:
            raise UsageError(f"--start {path}: a residual PPO checkpoint cannot start the eviction PPO") from None
    net = load_scorer_net(ckpt, str(path))
    return path, net, [str(n) for n in ckpt.config.get("needs", [])]


def run_capacities(config: EvictionPPOConfig, trace: Trace) -> list[int]:
    meta = trace.meta
    chosen = config.capacities or default_capacities(meta.num_experts, meta.top_k)
    for capacity in chosen:
        if not meta.top_k < capacity < meta.num_experts:
            raise UsageError(
                f"capacity {capacity} outside {meta.top_k + 1}..{meta.num_experts - 1}: below, a layer cannot hold its "
                f"top-{meta.top_k}; at {meta.num_experts} nothing is ever evicted"
            )
    return list(chosen)


class ProgressBar(BaseCallback):
    """A tqdm bar of timesteps on stderr (terminal only)."""

    def __init__(self, total: int):
        super().__init__()
        self.total = total
        self.bar: tqdm | None = None

    def _on_training_start(self) -> None:
        self.bar = tqdm(total=self.total, initial=self.num_timesteps, unit="step", desc="ppo", file=sys.stderr,
                        disable=not sys.stderr.isatty(), dynamic_ncols=True)  # fmt: skip

    def _on_step(self) -> bool:
        if self.bar is not None:
            self.bar.update(self.model.n_envs)
        return True

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_eviction_ppo(config: EvictionPPOConfig, train_trace: Trace, validation: Trace, run_dir: Path,
                       resume: bool = False, log: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Train (or continue) a run; returns the best policy's path. Ctrl-C saves a checkpoint and re-raises."""
    check_config(config)
    torch.set_num_threads(config.torch_threads)
    capacities = run_capacities(config, train_trace)
    start, start_net, needs = start_checkpoint(config)
    tables: str | None = None if config.tables.lower() == "none" else config.tables
    cost = cost_model_for(validation.meta, config.profile)
    if config.validation_sequences and len(validation.sequences) > config.validation_sequences:
        validation = Trace(validation.meta, validation.sequences[: config.validation_sequences])

    def make_env(rank: int):
        def build():
            env = EvictionDecisionEnv(train_trace, capacities, config.reward, config.max_candidates, tables,
                                      config.horizon_tokens)  # fmt: skip
            return Monitor(env, info_keywords=INFO_KEYS)

        return build

    venv = make_vec_env(config, [make_env(i) for i in range(config.n_envs)])  # type: ignore[arg-type]
    venv.seed(config.seed)
    if resume:
        model = PPO.load(resume_checkpoint(run_dir, log), env=venv, device="cpu")
        log(f"resuming {run_dir} at {model.num_timesteps} timesteps")
    else:
        hidden = start_net.body[0].out_features
        model = PPO(
            SetScorerPolicy, venv, **config.sb3_kwargs(), device="cpu", verbose=0,
            policy_kwargs=dict(hidden=hidden, value_hidden=config.value_hidden), tensorboard_log=str(run_dir / "tb"),
        )  # fmt: skip
        model.policy.scorer.load_state_dict(start_net.state_dict())
    described: dict[str, Any] = {"started_from": str(start), "needs": needs, "ppo_config": asdict(config)}
    references = {c: tuple(simulate(validation, name, c, cost).hit_rate for name in ("lru", "belady"))
                  for c in capacities}  # fmt: skip

    def save_policy(path: Path) -> None:
        save_eviction_ppo(copy.deepcopy(model.policy.scorer).eval(), described, path)

    def evaluate(path: Path) -> dict:
        rows = []
        for capacity in capacities:
            result = simulate(validation, PPOPolicy(path, tables=config.tables), capacity, cost)
            lru, belady = references[capacity]
            gap = (result.hit_rate - lru) / (belady - lru) if belady > lru else math.nan
            rows.append((result.hit_rate, result.stall_s_per_token, gap))
        hit, stall, gap = (float(np.nanmean(column)) if not all(map(math.isnan, column)) else math.nan
                           for column in zip(*rows, strict=True))  # fmt: skip
        return {"hit_rate": hit, "stall_s_per_token": stall, "gap_captured": gap}

    callback = EvalCallback(run_dir, evaluate, save_policy, config.eval_every, config.total_timesteps, log)
    progress = [ProgressBar(config.total_timesteps)]
    return learn_keeping_checkpoints(model, venv, config.total_timesteps, callback, progress, resume, run_dir,
                                     save_policy, log)  # fmt: skip
