"""Train a PPO expert-cache policy on traces and compare it with the heuristics on held-out traces.

The default config (train/configs/ppo.json, ``"mode": "evict"``) trains the shape-agnostic eviction PPO: the
imitation set scorer (the shipped one, or ``--start CKPT``) fine-tuned by PPO on the eviction-decision env; it runs
on any trace with no other flag, its budgets derived from the trace (1/8, 1/4, 1/2 of the experts). A config
without ``mode`` (train/configs/ppo-residual.json and the other ppo-*.json) trains the older residual PPO on
MoEOffloadEnv (one shape per checkpoint).

    python train/ppo.py --traces ../shared/traces/dsv2lite-puffin#id=1-800 --validation-traces ...#id=801-900 \
        --eval-traces ../shared/traces/dsv2lite-puffin#id=901-1000
    python train/ppo.py                         # builtin:tiny-mixtral/train, eval on builtin:tiny-mixtral/eval
    python train/ppo.py --traces T.jsonl#0 --validation-traces T.jsonl#1 --eval-traces T2.jsonl
    python train/ppo.py --run-dir runs/x --resume   # continue after Ctrl-C or a kill
    python train/ppo.py --n-envs 4                  # rollouts from 4 env worker processes (SubprocVecEnv)
    python train/ppo.py --tune train/configs/tune-ppo.json   # Ray Tune (ASHA) sweep; needs moe-env[ray]

Splits are by sequence (moe_env.agents.traces.make_splits): without --eval-traces the last 10% of the training
sequences are held out, without --validation-traces the last 20% of the rest validate; overlaps are refused.
Everything that can be checked before training is: config types and ranges, the cache size, output paths, that
the policy will run on the eval traces' model. Library code: agents/ppo.py, agents/ppo_evict_train.py,
agents/eviction_env.py, agents/ppo_train.py (residual), agents/evaluate.py, agents/tune.py (the sweep, residual).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from moe_env.agents.configs import load_config
from moe_env.agents.evaluate import compare, json_text, report, write_text_atomically
from moe_env.agents.ppo import PPOConfig
from moe_env.agents.ppo_evict_train import (
    MODE,
    EvictionPPOConfig,
    check_config,
    run_capacities,
    start_checkpoint,
    train_eviction_ppo,
)
from moe_env.agents.ppo_train import resolve_prior, resume_checkpoint, train_ppo, write_run_files
from moe_env.agents.traces import Splits, make_splits

from moe_env.error_boundary import run_reporting_errors
from moe_env.errors import UsageError
from moe_env.outputs import check_writable_dir, check_writable_file

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "ppo.json"
RESIDUAL_CONFIG = DEFAULT_CONFIG.with_name("ppo-residual.json")  # the default of --tune (sweeps the residual PPO)
POSITIVE = ("total_timesteps", "n_envs", "n_steps", "batch_size", "n_epochs", "learning_rate", "eval_every",
            "torch_threads")  # fmt: skip
RUN_KEYS = ("traces", "eval_traces", "validation_traces")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        default=None,
        help="PPO config JSON (default train/configs/ppo.json, the eviction "
        "PPO; with --tune train/configs/ppo-residual.json)",
    )
    p.add_argument("--traces", default=None, help="training traces, spec[#selection] (default: tiny-mixtral train)")
    p.add_argument("--eval-traces", default=None, help="held-out traces (default: the last 10%% of --traces)")
    p.add_argument("--validation-traces", default=None, help="model selection (default: last 20%% of training)")
    p.add_argument("--total-timesteps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--capacity", type=int, default=None, help="cache slots per layer (default: half the experts)")
    p.add_argument("--profile", default=None, help="cost model HARDWARE[:EXPERTS]")
    p.add_argument(
        "--start", default=None, help="eviction PPO: the imitation checkpoint to start from (default: the shipped one)"
    )
    p.add_argument("--reward", default=None, help="eviction PPO: belady | regret | misses (agents/eviction_env.py)")
    p.add_argument("--prior", default=None, help="residual PPO: score prior none | features | predictor")
    p.add_argument("--prior-predictor", default=None, help="residual PPO: predictor checkpoint for --prior predictor")
    p.add_argument("--run-dir", default=None, help="default runs/ppo-<model>-<time>")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print the final comparison as JSON rows")
    p.add_argument("--ship", default=None, help="copy the best policy here, with a .json of its run and results")
    p.add_argument("--n-envs", type=int, default=None, help="env worker processes for rollouts (SubprocVecEnv)")
    p.add_argument("--tune", default=None, help="hyperparameter sweep (Ray Tune, ASHA) from a search-space JSON")
    return p.parse_args(argv)


def config_mode(path: Path) -> str:
    """``evict`` for a config with ``"mode": "evict"``, else ``residual`` (load_config reports unreadable files)."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return "residual"
    return MODE if isinstance(values, dict) and values.get("mode") == MODE else "residual"


def load_run_config(args: argparse.Namespace) -> PPOConfig | EvictionPPOConfig:
    path = Path(args.config or (RESIDUAL_CONFIG if args.tune else DEFAULT_CONFIG))
    if args.resume and args.run_dir and (Path(args.run_dir) / "config.json").is_file():
        path = Path(args.run_dir) / "config.json"
    common = {"total_timesteps": args.total_timesteps, "seed": args.seed, "profile": args.profile}
    if config_mode(path) == MODE:
        for flag, value in (("--prior", args.prior), ("--prior-predictor", args.prior_predictor)):
            if value is not None:
                raise UsageError(f"{flag} applies to the residual PPO (--config train/configs/ppo-residual.json)")
        capacities = None if args.capacity is None else [args.capacity]
        overrides = common | {"capacities": capacities, "start": args.start, "reward": args.reward}
        config = load_config(EvictionPPOConfig, path, overrides, POSITIVE, ignore=RUN_KEYS)
    else:
        for flag, value in (("--start", args.start), ("--reward", args.reward)):
            if value is not None:
                raise UsageError(f'{flag} applies to the eviction PPO (a config with "mode": "evict")')
        overrides = common | {"capacity": args.capacity, "prior": args.prior, "prior_predictor": args.prior_predictor}
        config = load_config(PPOConfig, path, overrides, POSITIVE, ignore=RUN_KEYS)
    if args.n_envs is not None:
        if args.n_envs < 1:
            raise UsageError(f"--n-envs must be at least 1, got {args.n_envs}")
        config.n_envs, config.vec_env = args.n_envs, "subproc"
    return config


def ship(best: Path, target: Path, run_dir: Path, rows: list) -> None:
    """The policy-only file plus a JSON of its run (config, command, validation pick) and eval results."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(best, staging)
    os.replace(staging, target)
    summary = {
        "config": json.loads((run_dir / "config.json").read_text()),
        "commands": (run_dir / "command.txt").read_text().strip().splitlines(),
        "best_on_validation": json.loads((run_dir / "best.json").read_text()),
        "eval_rows": [row.as_dict() for row in rows],
    }
    write_text_atomically(target.with_suffix(".json"), json_text(summary) + "\n")


def tune_main(args: argparse.Namespace, config: PPOConfig, splits: Splits) -> int:
    from moe_env.agents.tune import load_tune_config, run_tune

    tune_config = load_tune_config(args.tune)
    model = splits.train.meta.model or "unnamed"
    run_dir = Path(args.run_dir or f"runs/tune-{model}-{time.strftime('%Y%m%d-%H%M%S')}")
    best = run_tune(tune_config, config, splits.train, splits.validation, run_dir)
    print(json.dumps(best, indent=1) if args.json else best["summary"])
    return 0


def evict_main(args: argparse.Namespace, config: EvictionPPOConfig, splits: Splits, log) -> int:
    """The eviction PPO: checks first (budgets, start checkpoint, output paths), then train, then the final
    tables: the trained policy against its starting imitation policy and the heuristics, at every budget."""
    if args.tune:
        raise UsageError("--tune sweeps the residual PPO (--config train/configs/ppo-residual.json)")
    check_config(config)
    meta = splits.train.meta
    for capacity in config.capacities or []:
        splits.checked_capacity(capacity)  # the messages every training script gives
    capacities = run_capacities(config, splits.train)
    for capacity in capacities:
        splits.checked_capacity(capacity)
    start, _, _ = start_checkpoint(config)
    run_dir = Path(args.run_dir or f"runs/ppo-{meta.model or 'unnamed'}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable_dir(run_dir, "--run-dir")
    if args.resume:
        resume_checkpoint(run_dir, lambda _: None)  # refuse now, not after writing the run files
    command = shlex.join([sys.executable, *sys.argv])
    specs = {"traces": args.traces, "eval_traces": args.eval_traces, "validation_traces": args.validation_traces}
    write_run_files(run_dir, config, specs, command)
    log(f"run {run_dir}: {config.total_timesteps} timesteps at {capacities} slots, starting from {start}; "
        f"{splits.note}")  # fmt: skip
    for warning in splits.warnings:
        log(warning)
    best = train_eviction_ppo(config, splits.train, splits.validation, run_dir, resume=args.resume, log=log)
    learned = [f"ppo:{best},tables={config.tables}", f"imitation:{start},tables={config.tables}"]
    all_rows = []
    for capacity in capacities:
        bench, rows = compare(splits.eval_label, splits.evaluation, learned, capacity, config.profile)
        if not args.json:
            report(bench, rows, False)
        all_rows += rows
    if args.json:
        print(json_text([row.as_dict() for row in all_rows]))
    if args.ship:
        ship(best, Path(args.ship), run_dir, all_rows)
        log(f"shipped {args.ship}")
    return 0


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    try:
        if args.resume and not args.run_dir:
            raise UsageError("--resume needs --run-dir")
        config = load_run_config(args)
        if args.ship:
            check_writable_file(args.ship, "--ship")
            check_writable_file(Path(args.ship).with_suffix(".json"), "--ship")
        splits = make_splits(args.traces, args.eval_traces, args.validation_traces)
        if isinstance(config, EvictionPPOConfig):
            return evict_main(args, config, splits, log)
        if args.tune:
            return tune_main(args, config, splits)
        meta = splits.train.meta
        capacity = splits.checked_capacity(config.capacity)
        run_dir = Path(args.run_dir or f"runs/ppo-{meta.model or 'unnamed'}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_writable_dir(run_dir, "--run-dir")
        if args.resume:
            resume_checkpoint(run_dir, lambda _: None)  # refuse now, not after writing the run files
        resolve_prior(config, meta, log)
        command = shlex.join([sys.executable, *sys.argv])
        specs = {"traces": args.traces, "eval_traces": args.eval_traces, "validation_traces": args.validation_traces}
        write_run_files(run_dir, config, specs, command)
        log(f"run {run_dir}: {config.total_timesteps} timesteps; {splits.note}")
        for warning in splits.warnings:
            log(warning)
        best = train_ppo(config, splits.train, splits.validation, run_dir, resume=args.resume, log=log)
        bench, rows = compare(splits.eval_label, splits.evaluation, [f"ppo:{best}"], capacity, config.profile)
        report(bench, rows, args.json)
        if args.ship:
            ship(best, Path(args.ship), run_dir, rows)
            log(f"shipped {args.ship}")
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    # bad input, or a policy plug-in failing inside training or the final table: one line and exit 2
    return run_reporting_errors("train/ppo.py", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
