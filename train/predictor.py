"""Train the expert-activation predictor on traces; report top-k precision/recall and the policy's cache figures.

    python train/predictor.py                   # builtin:tiny-mixtral/train, eval on builtin:tiny-mixtral/eval
    python train/predictor.py --traces T.jsonl#0 --eval-traces T.jsonl#1 --profile consumer-pcie4:mixtral-8x7b-4bit

Trains on the training traces minus a validation split (moe_env.agents.traces.split_validation), calibrates the prefetch
threshold and eviction weight on the validation split, reports on the eval traces. Writes OUT (default
runs/predictor-<model>.pt) usable as ``--policy predictor:OUT``; library code in agents/predictor.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch
from moe_env.agents.evaluate import compare, report
from moe_env.agents.predictor import (
    PredictorConfig,
    calibrate,
    collect_samples,
    prediction_report,
    save_predictor,
    train_predictor,
)
from moe_env.agents.traces import load_traces, split_validation

from moe_env.env import MoEOffloadEnv, default_capacity
from moe_env.errors import MoeEnvError, UsageError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "predictor.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="predictor config JSON (PredictorConfig fields)")
    p.add_argument("--traces", default="builtin:tiny-mixtral/train")
    p.add_argument("--eval-traces", default="builtin:tiny-mixtral/eval")
    p.add_argument("--capacity", type=int, default=None, help="cache slots per layer (default: half the experts)")
    p.add_argument("--profile", default=None, help="cost model HARDWARE[:EXPERTS]")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="checkpoint path (default runs/predictor-<model>.pt)")
    p.add_argument("--json", action="store_true", help="print precision/recall and the comparison as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    try:
        try:
            values = json.loads(Path(args.config).read_text())
            config = PredictorConfig(
                **{k: v for k, v in values.items() if k in {f.name for f in fields(PredictorConfig)}}
            )
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise UsageError(f"cannot read config {args.config}: {exc}") from None
        if args.epochs is not None:
            config.epochs = args.epochs
        if args.seed is not None:
            config.seed = args.seed
        train_trace, eval_trace = load_traces(args.traces), load_traces(args.eval_traces)
        meta = train_trace.meta
        capacity = args.capacity or default_capacity(meta.num_experts, meta.top_k)
        train_part, validation = split_validation(train_trace)
        train_samples = collect_samples(train_part, capacity, args.profile)
        eval_samples = collect_samples(eval_trace, capacity, args.profile)
        log(f"{len(train_samples.features)} training decisions, {len(eval_samples.features)} eval decisions")
        net = train_predictor(train_samples, config, log=log)
        spec = MoEOffloadEnv(train_trace, capacity=capacity, profile=args.profile, reference_metrics=False).model_spec
        out = Path(args.out or f"runs/predictor-{meta.model}.pt")
        save_predictor(net, config, spec, capacity, out)
        threshold, weight = calibrate(out, validation, capacity, args.profile, log=log)
        config.threshold, config.next_weight = threshold, weight
        summary = {
            "config": asdict(config),
            "traces": args.traces,
            "eval_traces": args.eval_traces,
            "capacity": capacity,
            "profile": args.profile,
            "command": shlex.join([sys.executable, *sys.argv]),
        }
        log(f"saved {out}")
        scores = prediction_report(net, eval_samples, meta.top_k)
        bench, rows = compare(args.eval_traces, eval_trace, [f"predictor:{out}"], capacity, args.profile)
        if args.json:
            print(json.dumps({"top_k_prediction": scores}, indent=1))
        else:
            print(f"top-{meta.top_k} prediction of the next layer's experts on {args.eval_traces}:")
            for name, s in scores.items():
                print(
                    f"  {name:26s} precision {s['precision']:.3f}  recall {s['recall']:.3f}  ({s['samples']} decisions)"
                )
        report(bench, rows, args.json)
        summary |= {"top_k_prediction": scores, "eval_rows": [row.as_dict() for row in rows]}
        out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    except MoeEnvError as exc:
        print(f"train/predictor.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
