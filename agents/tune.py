"""Hyperparameter sweeps of PPO on Ray Tune with ASHA early stopping (``python train/ppo.py --tune CONFIG``).

Each trial is one ``moe_env.agents.ppo_train.train_ppo`` run on the training split with one point of the search
space; it reports its validation metrics at every evaluation (``eval_every`` timesteps), so ASHA stops the weak
trials at its rungs and spends the budget on the good ones. The env reaches the trials through Ray's own
registry (``ray.tune.registry.register_env``: the Gymnasium registry lives in the driver's process only); the
traces travel through the object store once.

A tune config (train/configs/tune-*.json) holds the sweep, never the PPO defaults (those stay in --config)::

    {"num_samples": 4, "max_timesteps": 8192, "grace_timesteps": 2048, "reduction_factor": 2, "eval_every": 2048,
     "cpus_per_trial": 1, "workers": 2, "seed": 0,
     "search_space": {"learning_rate": {"loguniform": [1e-4, 1e-3]}, "residual_scale": {"choice": [0.25, 0.5]}}}

Each key of ``search_space`` is a PPOConfig field; its value is a constant or one of ``{"choice": [...]}``,
``{"uniform": [lo, hi]}``, ``{"loguniform": [lo, hi]}``, ``{"randint": [lo, hi]}`` (hi exclusive).
The best trial is the lowest validation stall per token over all its evaluations (its best-policy.pt).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moe_env.agents.ppo import PPOConfig
from moe_env.agents.ppo_train import train_ppo

from moe_env.env import MoEOffloadEnv
from moe_env.errors import UsageError
from moe_env.sweep import LOCAL_RAY_SYSTEM_CONFIG, import_ray
from moe_env.trace import Trace

ENV_NAME = "moe_env/MoEOffload-v0"  # the Gymnasium id, registered under the same name for Ray workers
METRIC = "stall_s_per_token"
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


@dataclass
class TuneConfig:
    """A sweep: how many trials, their budget, ASHA's rungs, resources, and the search space."""

    search_space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 4
    max_timesteps: int = 8192  # per trial (ASHA's max_t)
    grace_timesteps: int = 2048  # first rung: no trial stops before this
    reduction_factor: int = 2
    eval_every: int = 2048  # timesteps between reports (validation replays)
    cpus_per_trial: int = 1
    workers: int | None = None  # local Ray CPUs (None: all); ignored with address
    address: str | None = None  # an existing Ray cluster
    seed: int = 0

    def __post_init__(self) -> None:
        ppo_fields = {f.name for f in fields(PPOConfig)}
        for key, value in self.search_space.items():
            if key not in ppo_fields:
                raise UsageError(
                    f"search_space key {key!r} is not a PPO config field ({', '.join(sorted(ppo_fields))})"
                )
            if isinstance(value, dict) and (len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS):
                raise UsageError(f"search_space {key!r}: give a constant or one of {', '.join(DISTRIBUTIONS)}")
        for name in ("num_samples", "max_timesteps", "grace_timesteps", "reduction_factor", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"tune config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.reduction_factor < 2 or self.grace_timesteps > self.max_timesteps:
            raise UsageError("tune config: need reduction_factor >= 2 and grace_timesteps <= max_timesteps")


def load_tune_config(path: str | os.PathLike) -> TuneConfig:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read tune config {path}: {exc}") from None
    known = {f.name for f in fields(TuneConfig)}
    if not isinstance(values, dict) or set(values) - known:
        raise UsageError(f"tune config {path}: expected an object with keys among {', '.join(sorted(known))}")
    return TuneConfig(**values)


def search_space(config: TuneConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, value in config.search_space.items():
        if isinstance(value, dict):
            ((kind, arg),) = value.items()
            space[key] = tune.choice(arg) if kind == "choice" else getattr(tune, kind)(*arg)
        else:
            space[key] = value
    return space


def register_replay_env() -> None:
    """Make the replay env constructible by name on every Ray worker (RLlib and our trials look it up there)."""
    from ray.tune.registry import register_env

    register_env(ENV_NAME, lambda env_config: MoEOffloadEnv(**env_config))


def _trial(params: dict[str, Any], base: dict[str, Any], train: Trace, validation: Trace) -> None:
    from ray import tune
    from ray.tune.registry import ENV_CREATOR, _global_registry  # where register_env put it (as RLlib reads it)

    creator = _global_registry.get(ENV_CREATOR, ENV_NAME)
    config = PPOConfig.from_dict(base | params)
    run_dir = Path(tune.get_context().get_trial_dir())

    def report(metrics: dict) -> None:
        tune.report({k: (v if math.isfinite(v) else None) for k, v in metrics.items()})

    train_ppo(config, train, validation, run_dir, log=lambda _: None, on_eval=report,
              make_replay_env=lambda trace, **kwargs: creator({"trace": trace, **kwargs}))  # fmt: skip


def run_tune(config: TuneConfig, base: PPOConfig, train: Trace, validation: Trace, run_dir: Path) -> dict[str, Any]:
    """Run the sweep; returns the best trial (config, validation metrics, directory) and every trial's last row.
    Writes RUN_DIR/best-config.json: a PPO config to train the winner at full length (``--config``)."""
    ray = import_ray("--tune")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    trial_base = asdict(base) | {"total_timesteps": config.max_timesteps, "eval_every": config.eval_every}
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if config.address:
        ray.init(address=config.address, **options)
    else:
        ray.init(num_cpus=config.workers, _system_config=LOCAL_RAY_SYSTEM_CONFIG, **options)
    try:
        register_replay_env()
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=trial_base, train=train, validation=validation),
            {"cpu": config.cpus_per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(config),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="min", num_samples=config.num_samples,
                scheduler=ASHAScheduler(time_attr="timesteps", max_t=config.max_timesteps,
                                        grace_period=config.grace_timesteps, reduction_factor=config.reduction_factor),
                search_alg=BasicVariantGenerator(random_state=config.seed),
            ),
            run_config=tune.RunConfig(storage_path=str(run_dir), name="trials", verbose=1),
        )  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables must not mix with --json on stdout
            results = tuner.fit()
    finally:
        ray.shutdown()
    return summarise(results, trial_base, config, run_dir)


def summarise(results: Any, trial_base: dict[str, Any], config: TuneConfig, run_dir: Path) -> dict[str, Any]:
    finished = [r for r in results if r.error is None and r.metrics_dataframe is not None]
    if not finished:
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error is not None]
        raise UsageError(f"every tune trial failed; first error: {errors[0] if errors else 'no result reported'}")
    trials = []
    for r in finished:
        frame = r.metrics_dataframe
        best_row = frame.loc[frame[METRIC].idxmin()]
        trials.append({
            "params": {k: r.config[k] for k in config.search_space},
            "timesteps": int(frame["timesteps"].max()),
            METRIC: float(best_row[METRIC]),
            "hit_rate": float(best_row["hit_rate"]),
            "trial_dir": str(r.path),
        })  # fmt: skip
    trials.sort(key=lambda t: t[METRIC])
    best = trials[0]
    best_config = trial_base | best["params"]
    (run_dir / "best-config.json").write_text(json.dumps(best_config, indent=1) + "\n")
    stopped = sum(t["timesteps"] < config.max_timesteps for t in trials)
    lines = [f"{len(trials)} trials ({stopped} stopped early by ASHA), best validation stall per token first:"]
    lines += [f"  {1e3 * t[METRIC]:.4f} ms/token  hit {t['hit_rate']:.3f}  {t['timesteps']:>7} steps  {t['params']}"
              for t in trials]  # fmt: skip
    lines.append(f"best policy: {best['trial_dir']}/best-policy.pt; its config: {run_dir / 'best-config.json'}")
    return {"best": best, "trials": trials, "best_config": best_config, "summary": "\n".join(lines)}
