"""Imitation variants on one decision pool: feature ablations, scorer width, loss settings, gap on validation.

Collects round 0 of the imitation training once (LRU's states of PROMPTS training sequences at the given budgets,
Belady's labels, signal dropout and table-free share as the shipped config; with the shipped model tables of the
trace's shape) into --pool (reused when it exists), then fits one scorer per variant on that same pool and prints
each one's gap captured ((hit - LRU) / (Belady - LRU)) on the validation trace, one JSON line per variant. A variant
is a JSON object of fit settings (hidden, epochs, lr, batch, soft_weight, temperature, horizon_tokens,
regret_weight), "drop": feature columns zeroed in training (constant, so the scorer ignores them) and "slice":
[start, stop] the decisions of the pool it fits on (a train/imitation.py run's pool.npz holds its rounds in order:
one round's decisions alone, or round 0 and a DAgger round);
``"learner": "lgbm"`` fits a LightGBM lambdarank ranker instead (query = one eviction decision, graded relevance
from the candidate's next-use distance; settings trees, leaves, rate, min_rows): a stronger learner on the same rows,
as a ceiling test of the features (needs the `ceiling` extra: `pip install -e ".[ceiling]"`).

    .venv/bin/python bench/imitation_variants.py --train '../shared/traces/dsv2lite-puffin#id=1-800' \\
        --validation '../shared/traces/dsv2lite-puffin#id=801-830' \\
        --validation '../shared/traces/mixtral-8x7b-gsm8k-routing.jsonl#1' \\
        --eval-capacities 16,32 --eval-capacities 3,4,5 --prompts 120 --pool runs/pool-n120.npz \\
        --variants '{"drop": ["seq_tokens", "decay_long", "transition_mix"]}' '{}' '{"hidden": 64, "epochs": 16}'
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from moe_env.agents.candidate_features import FEATURES
from moe_env.agents.imitation import ScorerEviction, collect, replay, subsample
from moe_env.agents.model_tables import find_shipped_tables
from moe_env.agents.set_scorer import Decisions, NumpyScorer, agreement, fit_scorer

from moe_env.sim import model_spec, simulate
from moe_env.trace import load_trace

FIT_DEFAULTS = {"hidden": 32, "epochs": 8, "lr": 3e-3, "batch": 512, "soft_weight": 3.0, "temperature": 1.0,
                "horizon_tokens": 64.0, "regret_weight": False, "drop": [], "learner": "mlp", "trees": 300,
                "leaves": 63, "rate": 0.05, "min_rows": 100, "slice": [0, None]}  # fmt: skip
RELEVANCE_LEVELS = 8  # lambdarank grades: log next-use distance (capped at the horizon) in this many steps


class BoosterScorer:
    """Keep scores of a LightGBM ranker trained to rank the candidate to evict first (the lowest is evicted)."""

    def __init__(self, booster):
        self.booster = booster

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return -self.booster.predict(rows, num_threads=1)


def fit_booster(data: Decisions, settings: dict, horizon: float, seed: int) -> BoosterScorer:
    """LightGBM lambdarank, one query per decision: relevance rises with the candidate's log next-use distance
    (capped at `horizon`), Belady's choice on top."""
    import lightgbm

    x = np.log1p(np.minimum(data.distance, horizon)) / np.log1p(horizon)
    relevance = np.minimum((x * RELEVANCE_LEVELS).astype(np.int64), RELEVANCE_LEVELS - 1) + data.target
    params = {"objective": "lambdarank", "num_leaves": settings["leaves"], "learning_rate": settings["rate"],
              "min_data_in_leaf": settings["min_rows"], "lambdarank_truncation_level": 3, "num_threads": 1,
              "seed": seed, "verbose": -1, "label_gain": list(range(RELEVANCE_LEVELS + 1))}  # fmt: skip
    train = lightgbm.Dataset(data.rows, relevance, group=np.diff(data.offsets), free_raw_data=True)
    return BoosterScorer(lightgbm.train(params, train, num_boost_round=settings["trees"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="training traces spec")
    p.add_argument("--validation", required=True, action="append",
                   help="validation traces spec; repeatable (the first one's shape sets the next-use horizon)")
    p.add_argument("--prompts", type=int, default=120, help="training sequences drawn for the pool")
    p.add_argument("--decisions", type=int, default=150_000, help="decisions recorded (split over the budgets)")
    p.add_argument("--capacities", default="8,16,32", help="budgets of the pool (slots per layer)")
    p.add_argument("--eval-capacities", action="append", default=None,
                   help="budgets of the validation gap, one per --validation (default 16,32)")
    p.add_argument("--pool", required=True, help="the pool .npz (collected when absent)")
    p.add_argument("--variants", nargs="+", default=["{}"], help="JSON objects of fit settings")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def decisions_slice(pool: Decisions, start: int, stop: int | None) -> Decisions:
    """Decisions start..stop (Python slice bounds) of `pool`, offsets renumbered from 0."""
    chosen = range(pool.size)[slice(start, stop)]
    if chosen.step != 1 or not len(chosen):
        raise ValueError(f"slice [{start}, {stop}] selects no decisions of a pool of {pool.size}")
    lo, hi = int(pool.offsets[chosen.start]), int(pool.offsets[chosen.stop])
    distance = None if pool.distance is None else pool.distance[lo:hi]
    return Decisions(pool.rows[lo:hi], pool.target[lo:hi], pool.offsets[chosen.start : chosen.stop + 1] - lo, distance)


def pool_of(args: argparse.Namespace) -> Decisions:
    path = Path(args.pool)
    if not path.is_file():
        trace = load_trace(args.train)
        chosen = subsample(trace, args.prompts, args.seed)
        capacities = [int(c) for c in args.capacities.split(",")]
        tables = find_shipped_tables(model_spec(trace.meta))
        data, _ = collect(chosen, capacities, "lru", None, 0.0, args.decisions, tables, args.seed, 0.25, 0.2)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, rows=data.rows, target=data.target, offsets=data.offsets, distance=data.distance)
    with np.load(path) as z:
        return Decisions(z["rows"], z["target"], z["offsets"], z["distance"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    pool = pool_of(args)
    budgets = args.eval_capacities or ["16,32"] * len(args.validation)
    if len(budgets) != len(args.validation):
        print(f"error: {len(budgets)} --eval-capacities for {len(args.validation)} --validation: give one per trace",
              file=sys.stderr)  # fmt: skip
        return 2
    checks = []  # (spec, trace, tables, {capacity: (LRU hit rate, Belady hit rate)})
    for spec, text in zip(args.validation, budgets, strict=True):
        trace = load_trace(spec)
        references = {int(c): (simulate(trace, "lru", int(c)).hit_rate, simulate(trace, "belady", int(c)).hit_rate)
                      for c in text.split(",")}  # fmt: skip
        checks.append((spec, trace, find_shipped_tables(model_spec(trace.meta)), references))
    meta = checks[0][1].meta
    for text in args.variants:
        settings = FIT_DEFAULTS | json.loads(text)
        if settings["learner"] == "lgbm" and importlib.util.find_spec("lightgbm") is None:
            print('error: the lgbm learner needs LightGBM: pip install -e ".[ceiling]"', file=sys.stderr)
            return 2
        part = decisions_slice(pool, *settings["slice"])
        rows = part.rows.copy()
        for name in settings["drop"]:
            rows[:, FEATURES.index(name)] = 0.0
        started = time.perf_counter()
        data = Decisions(rows, part.target, part.offsets, part.distance)
        horizon = settings["horizon_tokens"] * meta.num_layers * meta.top_k
        if settings["learner"] == "lgbm":
            scorer = fit_booster(data, settings, horizon, args.seed)
        else:
            scorer = NumpyScorer(fit_scorer(data, settings["hidden"], settings["epochs"], settings["lr"],
                                            settings["batch"], args.seed, soft_weight=settings["soft_weight"],
                                            horizon=horizon, temperature=settings["temperature"],
                                            regret_weight=settings["regret_weight"]))  # fmt: skip
        gaps = {}
        for spec, trace, tables, references in checks:
            gaps[spec] = {}
            for c, (lru, belady) in references.items():
                hit = replay(trace, ScorerEviction(scorer, tables), c).hit_rate
                gaps[spec][c] = round((hit - lru) / (belady - lru), 4) if belady > lru else None
        print(json.dumps({"variant": json.loads(text), "decisions": pool.size, "gap_captured": gaps,
                          "train_agreement": round(agreement(scorer, data), 4),
                          "seconds": round(time.perf_counter() - started)}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
