"""Train the expert-activation predictor on traces; report top-k precision/recall and the policy's cache figures.

    python train/predictor.py                   # builtin:tiny-mixtral/train, eval on builtin:tiny-mixtral/eval
    python train/predictor.py --traces D#id=1-800 --eval-traces D#id=901-1000   # D=../shared/traces/dsv2lite-puffin
    python train/predictor.py --traces T.jsonl#0 --validation-traces T.jsonl#1 --eval-traces T2.jsonl

Trains on the training traces minus a validation split (moe_env.agents.traces.make_splits: splits by sequence,
overlaps refused), calibrates the prefetch threshold and eviction weight on the validation split, reports on the
eval traces. Config types and ranges, the cache size, the output path and that the eval traces' model fits are
checked before training. Writes OUT (default
runs/predictor-<model>.pt) usable as ``--policy predictor:OUT``; library code in agents/predictor.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from moe_env.agents.configs import load_config
from moe_env.agents.evaluate import compare, json_safe, json_text, report, write_text_atomically
from moe_env.agents.predictor import (
    PredictorConfig,
    calibrate,
    collect_samples,
    prediction_report,
    save_predictor,
    train_predictor,
)
from moe_env.agents.traces import make_splits

from moe_env.env import MoEOffloadEnv
from moe_env.error_boundary import run_reporting_errors
from moe_env.errors import MoeEnvError
from moe_env.outputs import check_writable_file

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "predictor.json"
POSITIVE = ("hidden", "epochs", "batch_size", "lr")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="predictor config JSON (PredictorConfig fields)")
    p.add_argument("--traces", default=None, help="training traces, spec[#selection] (default: tiny-mixtral train)")
    p.add_argument("--eval-traces", default=None, help="held-out traces (default: the last 10%% of --traces)")
    p.add_argument("--validation-traces", default=None, help="calibration (default: last 20%% of training)")
    p.add_argument("--capacity", type=int, default=None, help="cache slots per layer (default: half the experts)")
    p.add_argument("--profile", default=None, help="cost model HARDWARE[:EXPERTS]")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="checkpoint path (default runs/predictor-<model>.pt)")
    p.add_argument("--json", action="store_true", help="print precision/recall and the comparison as JSON")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    try:
        config = load_config(PredictorConfig, args.config, {"epochs": args.epochs, "seed": args.seed}, POSITIVE)
        splits = make_splits(args.traces, args.eval_traces, args.validation_traces)
        meta = splits.train.meta
        capacity = splits.checked_capacity(args.capacity)
        out = Path(args.out or f"runs/predictor-{meta.model or 'unnamed'}.pt")
        check_writable_file(out, "--out")
        check_writable_file(out.with_suffix(".json"), "--out")
        log(splits.note)
        for warning in splits.warnings:
            log(warning)
        train_samples = collect_samples(splits.train, capacity, args.profile)
        eval_samples = collect_samples(splits.evaluation, capacity, args.profile)
        log(f"{len(train_samples.features)} training decisions, {len(eval_samples.features)} eval decisions")
        net = train_predictor(train_samples, config, log=log)
        spec = MoEOffloadEnv(splits.train, capacity=capacity, profile=args.profile, reference_metrics=False).model_spec
        # trained and calibrated under a hidden name, then renamed: a kill never leaves OUT half-made or uncalibrated
        staging = out.with_name(f".{out.name}.training")
        save_predictor(net, config, spec, capacity, staging)
        threshold, weight = calibrate(staging, splits.validation, capacity, args.profile, log=log)
        os.replace(staging, out)
        config.threshold, config.next_weight = threshold, weight
        summary = {
            "config": asdict(config),
            "traces": args.traces,
            "validation_traces": args.validation_traces,
            "eval_traces": splits.eval_label,
            "capacity": capacity,
            "profile": args.profile,
            "command": shlex.join([sys.executable, *sys.argv]),
        }
        log(f"saved {out}")
        scores = prediction_report(net, eval_samples, meta.top_k)
        bench, rows = compare(splits.eval_label, splits.evaluation, [f"predictor:{out}"], capacity, args.profile)
        if args.json:
            print(json_text({"top_k_prediction": scores}))
        else:
            print(f"top-{meta.top_k} prediction of the next layer's experts on {splits.eval_label}:")
            for name, s in json_safe(scores).items():
                precision, recall = (f"{v:.3f}" if v is not None else "n/a" for v in (s["precision"], s["recall"]))
                print(f"  {name:26s} precision {precision}  recall {recall}  ({s['samples']} decisions)")
        report(bench, rows, args.json)
        summary |= {"top_k_prediction": scores, "eval_rows": [row.as_dict() for row in rows]}
        write_text_atomically(out.with_suffix(".json"), json_text(summary) + "\n")
    except MoeEnvError as exc:
        print(f"train/predictor.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    # a policy plug-in failing inside training or the final table: one line and exit 2, not a traceback
    return run_reporting_errors("predictor.py", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
