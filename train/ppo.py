"""Train a PPO expert-cache policy on traces and compare it with the heuristics on held-out traces.

    python train/ppo.py                         # builtin:tiny-mixtral/train, eval on builtin:tiny-mixtral/eval
    python train/ppo.py --traces T.jsonl#0 --eval-traces T.jsonl#1 --profile consumer-pcie4:mixtral-8x7b-4bit
    python train/ppo.py --run-dir runs/x --resume   # continue after Ctrl-C
    python train/ppo.py --n-envs 4                  # rollouts from 4 env worker processes (SubprocVecEnv)
    python train/ppo.py --tune train/configs/tune-ppo.json   # Ray Tune (ASHA) sweep; needs moe-env[ray]

Library code: agents/ppo.py (policy, plug-in), agents/ppo_train.py (training), agents/evaluate.py (table),
agents/tune.py (the sweep).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from moe_env.agents.evaluate import compare, report
from moe_env.agents.ppo import PPOConfig
from moe_env.agents.ppo_train import train_ppo, write_run_files
from moe_env.agents.traces import load_traces, split_validation

from moe_env.env import default_capacity
from moe_env.errors import MoeEnvError, UsageError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "ppo.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="PPO config JSON (moe_env.agents.ppo.PPOConfig)")
    p.add_argument("--traces", default="builtin:tiny-mixtral/train", help="training traces (spec[#i,j])")
    p.add_argument("--eval-traces", default="builtin:tiny-mixtral/eval", help="held-out traces (spec[#i,j])")
    p.add_argument("--total-timesteps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--capacity", type=int, default=None, help="cache slots per layer (default: half the experts)")
    p.add_argument("--profile", default=None, help="cost model HARDWARE[:EXPERTS]")
    p.add_argument("--prior", default=None, help="score prior: none | features | predictor")
    p.add_argument("--prior-predictor", default=None, help="predictor checkpoint for --prior predictor")
    p.add_argument("--run-dir", default=None, help="default runs/ppo-<model>-<time>")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print the final comparison as JSON rows")
    p.add_argument("--ship", default=None, help="copy the best policy here, with a .json of its run and results")
    p.add_argument("--n-envs", type=int, default=None, help="env worker processes for rollouts (SubprocVecEnv)")
    p.add_argument("--tune", default=None, help="hyperparameter sweep (Ray Tune, ASHA) from a search-space JSON")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> PPOConfig:
    path = Path(args.config)
    if args.resume and args.run_dir and (Path(args.run_dir) / "config.json").is_file():
        path = Path(args.run_dir) / "config.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read config {path}: {exc}") from None
    values = {k: v for k, v in values.items() if k not in ("traces", "eval_traces")}
    config = PPOConfig.from_dict(values)
    overrides = {"total_timesteps": args.total_timesteps, "seed": args.seed, "capacity": args.capacity,
                 "profile": args.profile, "prior": args.prior, "prior_predictor": args.prior_predictor}  # fmt: skip
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if args.n_envs is not None:
        if args.n_envs < 1:
            raise UsageError(f"--n-envs must be at least 1, got {args.n_envs}")
        config.n_envs, config.vec_env = args.n_envs, "subproc"
    return config


def ship(best: Path, target: Path, run_dir: Path, rows: list) -> None:
    """The policy-only file plus a JSON of its run (config, command, validation pick) and eval results."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, target)
    summary = {
        "config": json.loads((run_dir / "config.json").read_text()),
        "commands": (run_dir / "command.txt").read_text().strip().splitlines(),
        "best_on_validation": json.loads((run_dir / "best.json").read_text()),
        "eval_rows": [row.as_dict() for row in rows],
    }
    target.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str) + "\n")


def tune_main(args: argparse.Namespace, config: PPOConfig, train_trace, model: str) -> int:
    from moe_env.agents.tune import load_tune_config, run_tune

    tune_config = load_tune_config(args.tune)
    run_dir = Path(args.run_dir or f"runs/tune-{model}-{time.strftime('%Y%m%d-%H%M%S')}")
    train_part, validation = split_validation(train_trace)
    best = run_tune(tune_config, config, train_part, validation, run_dir)
    print(json.dumps(best, indent=1) if args.json else best["summary"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args)
        train_trace, eval_trace = load_traces(args.traces), load_traces(args.eval_traces)
        model = train_trace.meta.model
        if args.tune:
            return tune_main(args, config, train_trace, model)
        run_dir = Path(args.run_dir or f"runs/ppo-{model}-{time.strftime('%Y%m%d-%H%M%S')}")
        if args.resume and not args.run_dir:
            raise UsageError("--resume needs --run-dir")
        command = shlex.join([sys.executable, *sys.argv])
        write_run_files(run_dir, config, {"traces": args.traces, "eval_traces": args.eval_traces}, command)
        log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
        log(f"run {run_dir}: {config.total_timesteps} timesteps on {args.traces}, eval on {args.eval_traces}")
        train_part, validation = split_validation(train_trace)
        log(
            f"{len(train_part.sequences)} training sequences, {len(validation.sequences)} for validation"
            f"{' (the same: fewer than 5)' if validation is train_trace else ''}"
        )
        best = train_ppo(config, train_part, validation, run_dir, resume=args.resume, log=log)
        capacity = config.capacity or default_capacity(eval_trace.meta.num_experts, eval_trace.meta.top_k)
        bench, rows = compare(args.eval_traces, eval_trace, [f"ppo:{best}"], capacity, config.profile)
        report(bench, rows, args.json)
        if args.ship:
            ship(best, Path(args.ship), run_dir, rows)
            log(f"shipped {args.ship}")
    except MoeEnvError as exc:
        print(f"train/ppo.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
