"""Train the shape-agnostic prefetch predictor on any trace; report its per-layer precision/recall at k.

    python train/predictor.py --traces T [--validation-traces V] [--eval-traces E]
    python train/predictor.py --traces D#id=1-800 --validation-traces D#id=801-900 --eval-traces D#id=901-1000
    python train/predictor.py --run-dir runs/x --resume        # continue after Ctrl-C, from the last epoch
    python train/predictor.py --traces T --validation-traces V --calibrate CKPT --out OUT   # no training

Every default comes from the trace: validation is the last fifth of the training sequences and evaluation the
last tenth of --traces unless given (splits by sequence, overlaps refused: agents/traces.py make_splits); the
calibration budget is a quarter of the experts; model tables are built from the training split only (training
rows use tables of the other half of the training sequences, so a row never sees its own routing in a table).
The run directory (default runs/predictor-<model>-<time>) holds config.json, command.txt, log.txt, tb/
(TensorBoard), samples-*.npz and epoch-N.pt (for --resume), best.pt (lowest validation loss, calibrated),
tables.npz and summary.json; --out (default RUN_DIR/predictor.pt) gets best.pt and a .json of the run, usable
as ``--prefetch predictor:OUT,tables=RUN_DIR/tables.npz``. ``--calibrate CKPT`` trains nothing: OUT is CKPT with
its prefetch setting (threshold, horizon, in-flight budget) calibrated on the first ``calibrate_sequences``
validation sequences (model tables: the shipped ones of the shape, as the plug-in's default). Library code:
agents/set_predictor.py, agents/prefetch_predictor.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from moe_env.agents.configs import load_config
from moe_env.agents.evaluate import json_safe, json_text, write_text_atomically
from moe_env.agents.model_tables import build_tables, load_tables, save_tables
from moe_env.agents.predictor_training import (
    TrainingData,
    cache_figures,
    collect_training,
    load_epoch,
    load_samples,
    save_samples,
)
from moe_env.agents.prefetch_predictor import (
    THRESHOLDS,
    SetPredictorConfig,
    calibrate,
    default_calibration_capacity,
    load_set_predictor,
    needed_signals,
    save_set_predictor,
)
from moe_env.agents.set_predictor import bce, new_net, prediction_quality, samples_for, train_epoch
from moe_env.agents.set_scorer import NumpyScorer
from moe_env.agents.traces import make_splits
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from moe_env.error_boundary import run_reporting_errors
from moe_env.errors import UsageError
from moe_env.outputs import check_writable_file
from moe_env.trace import Trace

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "predictor.json"
POSITIVE = (
    "hidden",
    "epochs",
    "batch_size",
    "lr",
    "max_samples",
    "validation_samples",
    "validation_sequences",
    "calibrate_sequences",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="predictor config JSON (SetPredictorConfig fields)")
    p.add_argument("--traces", default=None, help="training traces, spec[#selection] (default: tiny-mixtral train)")
    p.add_argument("--validation-traces", "--validation", default=None,
                   help="validation (default: the last fifth of the training sequences)")  # fmt: skip
    p.add_argument("--eval-traces", default=None, help="held-out traces (default: the last tenth of --traces)")
    p.add_argument("--capacity", type=int, default=None, help="calibration cache slots per layer (default E/4)")
    p.add_argument("--profile", default=None, help="cost model HARDWARE[:EXPERTS] of the calibration")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--run-dir", default=None, help="default runs/predictor-<model>-<time>")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir after its last epoch")
    p.add_argument("--out", default=None, help="checkpoint path (default RUN_DIR/predictor.pt)")
    p.add_argument("--json", action="store_true", help="print the prediction quality as JSON")
    p.add_argument("--calibrate", default=None, metavar="CKPT",
                   help="only calibrate this checkpoint's prefetch setting on validation, into --out")  # fmt: skip
    p.add_argument("--thresholds", default=None, help="thresholds the calibration tries, comma-separated "
                   "(default: agents/prefetch_predictor.py THRESHOLDS)")  # fmt: skip
    return p.parse_args(argv)


def _config(args: argparse.Namespace, run_dir: Path) -> SetPredictorConfig:
    path = run_dir / "config.json" if args.resume else Path(args.config)
    overrides = {"epochs": args.epochs, "seed": args.seed}
    config = load_config(SetPredictorConfig, path, overrides, POSITIVE)
    config.check()
    return config


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    run_dir = Path(args.run_dir) if args.run_dir else None
    try:
        if args.resume and run_dir is None:
            raise UsageError("--resume needs the --run-dir of the run to continue")
        if args.resume and not (run_dir / "config.json").is_file():
            raise UsageError(f"--resume: {run_dir} holds no run (no config.json)")
        if args.resume:
            saved = json.loads((run_dir / "traces.json").read_text())
            args.traces, args.validation_traces, args.eval_traces = saved["traces"], saved["validation"], saved["eval"]
            args.capacity, args.profile = saved["capacity"], saved["profile"]
        config = _config(args, run_dir or Path("."))
        args.thresholds = _thresholds(args.thresholds)  # refused before anything is loaded or written
        splits = make_splits(args.traces, args.eval_traces, args.validation_traces)
        if args.calibrate is not None:
            return _calibrate_only(args, config, splits, say)
        meta = splits.train.meta
        capacity = args.capacity if args.capacity is not None else config.calibrate_capacity
        if capacity is None:
            capacity = default_calibration_capacity(meta.num_experts, meta.top_k)
        splits.checked_capacity(capacity)
        run_dir = run_dir or Path(f"runs/predictor-{meta.model or 'unnamed'}-{time.strftime('%Y%m%d-%H%M%S')}")
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--run-dir {run_dir} exists and is not a directory")
        out = Path(args.out) if args.out else run_dir / "predictor.pt"
        check_writable_file(out, "--out")
        check_writable_file(out.with_suffix(".json"), "--out")
        check_writable_file(run_dir / "config.json", "--run-dir")
        say(splits.note)
        for warning in splits.warnings:
            say(warning)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
            (run_dir / "traces.json").write_text(json.dumps({
                "traces": args.traces, "validation": args.validation_traces, "eval": args.eval_traces,
                "capacity": capacity, "profile": args.profile}))  # fmt: skip
        with (run_dir / "command.txt").open("a") as f:
            f.write(shlex.join([sys.executable, *sys.argv]) + "\n")
        logfile = (run_dir / "log.txt").open("a")

        def log(message: str) -> None:
            logfile.write(message + "\n")
            logfile.flush()
            tqdm.write(message, file=sys.stderr if args.json else sys.stdout)

        data = _data(splits.train, splits.validation, config, run_dir, args.resume, log)
        say(f"{len(data.train.layer)} training decisions ({len(data.train.layer) * meta.num_experts} expert rows), "
            f"{len(data.validation.layer)} validation decisions")  # fmt: skip
        sys.stdout.flush()
        best_path = _train(data, config, run_dir, args.resume, log)
        threshold, stall = calibrate(best_path, _head(splits.validation, config.calibrate_sequences), capacity,
                                     args.profile, tables=data.tables, log=log,
                                     thresholds=args.thresholds)  # fmt: skip
        evaluation = samples_for(splits.evaluation, data.tables, config.validation_samples, config.seed + 1)
        net, _ = load_set_predictor(best_path)
        quality = prediction_quality(evaluation, NumpyScorer(net), meta.top_k)
        eval_head = _head(splits.evaluation, config.calibrate_sequences)
        figures = cache_figures(eval_head, best_path, data.tables, capacity, args.profile)
        summary = {
            "config": asdict(config), "traces": args.traces, "validation_traces": args.validation_traces,
            "eval_traces": splits.eval_label, "capacity": capacity, "profile": args.profile,
            "threshold": threshold, "validation_stall_s_per_token": stall,
            "command": shlex.join([sys.executable, *sys.argv]), "top_k_prediction": quality,
            "cache_figures": {"sequences": len(eval_head.sequences), "rows": figures},
        }  # fmt: skip
        staging = out.with_name(f".{out.name}.training")
        shutil.copyfile(best_path, staging)
        os.replace(staging, out)
        write_text_atomically(out.with_suffix(".json"), json_text(summary) + "\n")
        write_text_atomically(run_dir / "summary.json", json_text(summary) + "\n")
        say(f"saved {out} (use: --prefetch predictor:{out},tables={run_dir / 'tables.npz'})")
        if args.json:
            print(json_text({"top_k_prediction": quality, "cache_figures": figures}))
        else:
            _print_quality(quality, splits.eval_label, meta.top_k)
            print(f"cache figures at {capacity} slots on the first {len(eval_head.sequences)} eval sequences:")
            for row in figures:
                stall = 1e3 * row["stall_s_per_token"]
                print(f"  {row['policy']:28s} hit rate {row['hit_rate']:.3f}  stall {stall:.3f} ms/token"
                      f"  prefetch used {row['prefetch_used']} wasted {row['prefetch_wasted']}")  # fmt: skip
    except KeyboardInterrupt:
        print(f"train/predictor.py: interrupted; continue with --run-dir {run_dir} --resume", file=sys.stderr)
        return 130
    return 0


def _calibrate_only(args: argparse.Namespace, config: SetPredictorConfig, splits, say) -> int:
    source = Path(args.calibrate)
    load_set_predictor(source)  # refused in one line if it is not a set predictor
    if not args.out:
        raise UsageError("--calibrate needs --out (the calibrated copy; the checkpoint itself is left as it is)")
    out = Path(args.out)
    check_writable_file(out, "--out")
    meta = splits.train.meta
    capacity = args.capacity if args.capacity is not None else config.calibrate_capacity
    if capacity is None:
        capacity = default_calibration_capacity(meta.num_experts, meta.top_k)
    splits.checked_capacity(capacity)
    validation = _head(splits.validation, config.calibrate_sequences)
    staging = out.with_name(f".{out.name}.calibrating")
    shutil.copyfile(source, staging)
    try:
        threshold, stall = calibrate(staging, validation, capacity, args.profile, log=say,
                                     thresholds=args.thresholds)  # fmt: skip
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    say(f"saved {out} (threshold {threshold}, {1e3 * stall:.3f} ms/token on {len(validation.sequences)} validation "
        "sequences)")  # fmt: skip
    return 0


def _thresholds(text: str | tuple | None) -> tuple[float, ...]:
    if text is None:
        return THRESHOLDS
    if isinstance(text, tuple):  # already parsed
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--thresholds: comma-separated numbers in (0, 1], not {text!r}") from None
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise UsageError(f"--thresholds: comma-separated numbers in (0, 1], not {text!r}")
    return values


def _head(trace: Trace, n: int) -> Trace:
    return Trace(trace.meta, trace.sequences[:n])


def _data(train: Trace, validation: Trace, config: SetPredictorConfig, run_dir: Path, resume: bool,
          log) -> TrainingData:  # fmt: skip
    if resume and (run_dir / "samples-train.npz").is_file():
        log(f"resuming from the samples in {run_dir}")
        tables = load_tables(run_dir / "tables.npz")
        return TrainingData(load_samples(run_dir / "samples-train.npz"),
                            load_samples(run_dir / "samples-validation.npz"), tables)  # fmt: skip
    tables = build_tables(train)
    save_tables(tables, run_dir / "tables.npz", model=train.meta.model)
    replayed = min(len(train.sequences), config.max_sequences or len(train.sequences))
    replayed += min(len(validation.sequences), config.validation_sequences)
    bar = tqdm(total=replayed, desc="collecting samples", file=sys.stderr)
    data = collect_training(train, validation, tables, config, progress=lambda _: bar.update(1))
    bar.close()
    save_samples(data.train, run_dir / "samples-train.npz")
    save_samples(data.validation, run_dir / "samples-validation.npz")
    log(f"needs (never missing in training): {needed_signals(data.train) or 'nothing'}")
    return data


def _train(data: TrainingData, config: SetPredictorConfig, run_dir: Path, resume: bool, log) -> Path:
    """Epochs of pointwise BCE; every epoch saved (epoch-N.pt) and the best by validation loss as best.pt."""
    start, net, history = load_epoch(run_dir) if resume else (0, None, [])
    net = net or new_net(data.train, config.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    rng = np.random.default_rng(config.seed + start)
    torch.manual_seed(config.seed + start)
    writer = SummaryWriter(str(run_dir / "tb"))
    needs = needed_signals(data.train)
    top_k = int(data.train.truth[0].sum()) if len(data.train.layer) else 1
    bar = tqdm(total=config.epochs, initial=start, desc="epochs", file=sys.stderr)
    for epoch in range(start, config.epochs):
        loss = train_epoch(net, opt, data.train, config.batch_size, rng)
        validation_loss = bce(net, data.validation)
        quality = prediction_quality(data.validation, NumpyScorer(net), top_k)["predictor"]["precision"]
        writer.add_scalar("train/bce", loss, epoch)
        writer.add_scalar("validation/bce", validation_loss, epoch)
        writer.add_scalar("validation/precision_at_k", quality, epoch)
        history.append({"epoch": epoch, "train_bce": loss, "validation_bce": validation_loss,
                        "validation_precision_at_k": quality})  # fmt: skip
        log(f"epoch {epoch + 1}/{config.epochs}: train BCE {loss:.4f}, validation BCE {validation_loss:.4f}, "
            f"validation precision at {top_k} {quality:.3f}")  # fmt: skip
        save_set_predictor(net, config, run_dir / f"epoch-{epoch}.pt",
                           {"epoch": epoch, "history": json_safe(history), "needs": needs})  # fmt: skip
        if validation_loss <= min(h["validation_bce"] for h in history):
            shutil.copyfile(run_dir / f"epoch-{epoch}.pt", run_dir / "best.pt")
        bar.update(1)
    bar.close()
    writer.close()
    if not (run_dir / "best.pt").is_file():
        raise UsageError(f"{run_dir}: no epoch finished; nothing to calibrate")
    return run_dir / "best.pt"


def _print_quality(quality: dict, label: str, top_k: int) -> None:
    print(f"top-{top_k} prediction of the next layer's experts on {label} (rows every method can score):")
    for name, s in json_safe(quality).items():
        layers = [v[0] for v in s["per_layer"].values()]
        spread = f"per layer {min(layers):.3f}..{max(layers):.3f}" if layers else ""
        precision = f"{s['precision']:.3f}" if s["precision"] is not None else "n/a"
        recall = f"{s['recall']:.3f}" if s["recall"] is not None else "n/a"
        print(f"  {name:16s} precision {precision}  recall {recall}  {spread}  ({s['samples']} decisions)")


def main(argv: list[str] | None = None) -> int:
    # bad input, or a policy plug-in failing inside training or the final table: one line and exit 2
    return run_reporting_errors("train/predictor.py", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
