"""Train the imitation eviction policy (Belady's choices, DAgger rounds) on traces; report the gap it captures.

    python train/imitation.py --traces builtin:tiny-mixtral/train
    python train/imitation.py --traces DSV2.npz#0-799 --validation DSV2.npz#800-899 --traces MIXTRAL.jsonl
    python train/imitation.py --run-dir runs/x --resume        # continue after Ctrl-C, from the last round

Every default comes from the traces (budgets: 1/8, 1/4, 1/2 of the experts); a validation split is the last
fifth of each training trace's sequences unless --validation is given (model tables are built from the training
part only). The run directory holds config.json, command.txt, log.txt, tb/ (TensorBoard), round-N.pt and
pool.npz (for --resume), best.pt (the round with the best mean validation gap), tables-<i>.npz and summary.json.
Library code: agents/imitation.py, agents/set_scorer.py, agents/candidate_features.py, agents/model_tables.py.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from moe_env.agents import configs
from moe_env.agents.imitation import (
    ImitationConfig,
    RoundResult,
    dagger,
    gap_report,
    mean_gap,
    needed_signals,
    save_imitation,
    torch_threads,
)
from moe_env.agents.model_tables import build_tables, load_tables, save_tables
from moe_env.agents.run_state import load_pool, load_round, save_pool
from moe_env.agents.traces import split_validation
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from moe_env.error_boundary import run_reporting_errors
from moe_env.errors import UsageError
from moe_env.trace import load_trace

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "imitation.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None,
                   help="imitation config JSON (ImitationConfig fields; default train/configs/imitation.json); with "
                        "--resume it replaces the run's own (more rounds, a beta schedule)")  # fmt: skip
    p.add_argument("--traces", action="append", default=None, help="training traces (spec[#i,j]); repeatable")
    p.add_argument("--validation", action="append", default=None,
                   help="validation traces, one per --traces (default: the last fifth of each)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--run-dir", default=None, help="default runs/imitation-<time>")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir after its last round")
    p.add_argument("--ship", default=None, help="copy best.pt here, with a .json of the run")
    return p.parse_args(argv)


# what a resumed run may change: how long and on whose states it goes on, never what the saved rounds were made of
RESUMABLE = frozenset({"rounds", "epochs", "lr", "batch_size", "beta", "beta_schedule", "resample_sequences",
                       "max_decisions_per_round", "learner_experts"})  # fmt: skip


def load_config(args: argparse.Namespace, run_dir: Path) -> ImitationConfig:
    saved = run_dir / "config.json" if args.resume else DEFAULT_CONFIG
    path = Path(args.config) if args.config else saved
    overrides = {name: getattr(args, name) for name in ("rounds", "epochs", "seed")}
    config = configs.load_config(ImitationConfig, path, overrides, positive=("rounds", "epochs"))
    if args.resume and args.config:
        before = asdict(configs.load_config(ImitationConfig, saved, {}, positive=()))
        changed = sorted(k for k, v in asdict(config).items() if before[k] != v and k not in RESUMABLE)
        if changed:
            raise UsageError(f"--resume --config {path}: {', '.join(changed)} differ from the run's own "
                             f"config.json; a resumed run may change only {', '.join(sorted(RESUMABLE))} (start a "
                             "new run)")  # fmt: skip
        kept = run_dir / f"config-before-resume-{len(list(run_dir.glob('config-before-resume-*.json'))) + 1}.json"
        shutil.copyfile(saved, kept)  # the settings the earlier rounds were made with
    return config


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    torch_threads(1)
    try:
        if args.resume and not args.run_dir:
            raise UsageError("--resume needs the --run-dir of the run to continue")
        run_dir = Path(args.run_dir or f"runs/imitation-{time.strftime('%Y%m%d-%H%M%S')}")
        if args.resume and not (run_dir / "config.json").is_file():
            raise UsageError(f"--resume: {run_dir} holds no run (no config.json)")
        config = load_config(args, run_dir)
        specs = args.traces or ["builtin:tiny-mixtral/train"]
        if args.resume:
            saved = json.loads((run_dir / "traces.json").read_text())
            specs, validation_specs = saved["traces"], saved["validation"]
        else:
            validation_specs = args.validation or []
        if validation_specs and len(validation_specs) != len(specs):
            raise UsageError(f"{len(validation_specs)} --validation for {len(specs)} --traces: give one per trace")
        training, validation = [], []
        for i, spec in enumerate(specs):
            trace = load_trace(spec)
            if validation_specs:
                part, held = trace, load_trace(validation_specs[i])
            else:
                part, held = split_validation(trace)
            tables_path = run_dir / f"tables-{i}.npz"
            tables = None
            if args.resume:
                tables = load_tables(tables_path) if tables_path.is_file() else None
            elif len(part.sequences) >= config.tables_min_sequences:
                tables = build_tables(part)
                run_dir.mkdir(parents=True, exist_ok=True)
                save_tables(tables, tables_path, model=part.meta.model)
            training.append((part, tables))
            validation.append((validation_specs[i] if validation_specs else spec, held, tables))  # the label
        run_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume or args.config:  # a resumed run keeps the config it continued with
            (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
            (run_dir / "traces.json").write_text(json.dumps({"traces": specs, "validation": validation_specs}))
        with (run_dir / "command.txt").open("a") as f:
            f.write(shlex.join([sys.executable, *sys.argv]) + "\n")
        net = best = None
        start = 0
        history: list[dict] = []
        if args.resume:
            start, net, history = load_round(run_dir)
            scored = [h for h in history if not math.isnan(h["mean_gap"])]
            best = max(scored, key=lambda h: h["mean_gap"])["round"] if scored else None  # best.pt's round
        pool = load_pool(run_dir) if start else None
        writer = SummaryWriter(str(run_dir / "tb"))
        logfile = (run_dir / "log.txt").open("a")
        bar = tqdm(total=config.rounds, initial=start, desc="DAgger rounds", file=sys.stderr)

        def log(message: str) -> None:
            logfile.write(message + "\n")
            logfile.flush()
            if "epoch" not in message:
                tqdm.write(message, file=sys.stderr)

        references: dict = {}

        def evaluate(network, round_index: int) -> RoundResult:
            report = gap_report(network, validation, config, references)
            result = RoundResult(round_index, "", 0, 0, math.nan)
            for label, per in report.items():
                for capacity, v in per.items():
                    result.validation_hit_rate[capacity] = v["hit_rate"]
                    result.validation_gap[capacity] = v["gap_captured"]
                    writer.add_scalar(f"validation/gap_captured/{Path(label).name}/{capacity}", v["gap_captured"],
                                      round_index)  # fmt: skip
            gap = mean_gap(report)
            writer.add_scalar("validation/mean_gap_captured", gap, round_index)
            log(f"round {round_index}: validation gap captured {json.dumps(_rounded(report))}")
            result.report = report  # type: ignore[attr-defined]
            result.mean_gap = gap  # type: ignore[attr-defined]
            return result

        def on_round(round_index: int, network, pool_now, result: RoundResult) -> None:
            nonlocal best
            entry = asdict(result) | {"mean_gap": result.mean_gap, "report": result.report}  # type: ignore[attr-defined]
            history.append(entry)
            writer.add_scalar("train/decisions", result.pool, round_index)
            if not math.isnan(result.learner_agreement):
                writer.add_scalar("train/learner_agreement_with_belady", result.learner_agreement, round_index)
            save_imitation(network, config, specs, run_dir / f"round-{round_index}.pt",
                           {"round": round_index, "history": history, "needs": needed_signals(pool_now)})  # fmt: skip
            save_pool(run_dir, pool_now)
            best_gap = max(h["mean_gap"] for h in history if not math.isnan(h["mean_gap"])) if any(
                not math.isnan(h["mean_gap"]) for h in history) else math.nan  # fmt: skip
            if best is None or result.mean_gap == best_gap or math.isnan(best_gap):
                best = round_index
                shutil.copyfile(run_dir / f"round-{round_index}.pt", run_dir / "best.pt")
            bar.update(1)

        def progress_log(message: str) -> None:
            log(message)
            if "listwise loss" in message:
                parts = message.split()
                round_index, loss = int(parts[1]), float(parts[-1])
                writer.add_scalar("train/listwise_loss", loss, round_index)

        dagger(training, [], config, evaluate, log=progress_log, start_round=start, pool=pool, net=net,
               on_round=on_round)  # fmt: skip
        bar.close()
        writer.close()
        summary = {"config": asdict(config), "traces": specs, "validation": validation_specs, "rounds": history,
                   "best_round": best}  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"best round {best}: {run_dir / 'best.pt'}")
        for h in history:
            print(f"round {h['round']} ({h['behaviour']}): mean validation gap captured {h['mean_gap']:+.3f}")
        if args.ship:
            ship = Path(args.ship)
            ship.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / "best.pt", ship)
            ship.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    except KeyboardInterrupt:
        print(f"train/imitation.py: interrupted; continue with --run-dir {run_dir} --resume", file=sys.stderr)
        return 130
    return 0


def _rounded(report: dict) -> dict:
    return {Path(label).name: {c: round(v["gap_captured"], 3) for c, v in per.items()} for label, per in report.items()}


def main(argv: list[str] | None = None) -> int:
    # bad input, or a policy plug-in failing inside training or the final table: one line and exit 2
    return run_reporting_errors("train/imitation.py", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
