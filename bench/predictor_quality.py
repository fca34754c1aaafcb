"""Prediction quality per layer of the prefetch predictor against the simple signals (precision and recall at k).

    python bench/predictor_quality.py                       # DSV2-Lite prompts 901-1000 and the Mixtral log
    python bench/predictor_quality.py --trace T [--trace T2] [--predictor PATH] [--tables shipped|none|PATH]

For every decode (t, m >= 1) of each trace (a random `--max-samples` of them), after layer m-1 of token t has
routed: the top-k (k = the model's top-k) of the predictor's scores for layer m, of "the same experts as the
previous token", of the inter-layer signal alone (co-activation with layer m-1's experts at this token, online
statistics warm-started from the model tables) and of the token table alone (popularity where the table does not
know the token), against the experts layer m routes. Every method is scored on the same rows (t >= 1). The online
statistics keep learning over the trace's sequences, as a server's would; nothing is trained on these prompts.
Prints a summary (mean, min and max over layers) and, with --per-layer, the full per-layer table (markdown).
``--horizon H`` adds precision at k of predicting layer l+d (d = 1..H) right after layer l, as the prefetch plug-in
predicts it with a horizon (the inter-layer signal chained through the predicted layers), against the previous
token at layer l+d, the inter-layer signal chained through the co-activation tables alone, and the token table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from moe_env.agents.evaluate import json_safe
from moe_env.agents.model_tables import find_shipped_tables, load_tables
from moe_env.agents.prefetch_predictor import load_set_predictor, shipped_predictor_path
from moe_env.agents.set_predictor import AHEAD_METHODS, ahead_quality, decode_cells, prediction_quality, samples_for
from moe_env.agents.set_scorer import NumpyScorer

from moe_env.errors import MoeEnvError, UsageError
from moe_env.sim import model_spec
from moe_env.trace import load_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
DEFAULT_TRACES = (f"{SHARED}/dsv2lite-puffin#id=901-1000", f"{SHARED}/mixtral-8x7b-gsm8k-routing.jsonl")
METHODS = ("predictor", "previous_token", "inter_layer", "token_table")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", action="append", default=None, help="trace spec[#selection] (repeatable)")
    p.add_argument("--predictor", default=None, help="set-predictor checkpoint (default: the shipped one)")
    p.add_argument("--tables", default="shipped", help="model tables: shipped (by shape) | none | PATH")
    p.add_argument("--max-samples", type=int, default=30_000, help="(t, m) cells per trace, drawn at random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-layer", action="store_true", help="also print the per-layer table")
    p.add_argument("--horizon", type=int, default=1, help="also report layers 1..H ahead (default 1: not)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def quality_of(spec: str, scorer: NumpyScorer, tables_choice: str, max_samples: int, seed: int,
               horizon: int = 1) -> dict:  # fmt: skip
    trace = load_trace(spec)
    model = model_spec(trace.meta)
    if tables_choice == "shipped":
        tables = find_shipped_tables(model)
    elif tables_choice == "none":
        tables = None
    else:
        tables = load_tables(tables_choice, model)
    samples = samples_for(trace, tables, max_samples, seed)
    quality = prediction_quality(samples, scorer, trace.meta.top_k)
    shape = (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k)
    out = {"trace": spec, "shape": shape, "tables": tables is not None, "quality": quality}
    if horizon > 1:
        keep = min(1.0, max_samples / max(decode_cells(trace), 1))
        out["ahead"] = ahead_quality(trace, tables, scorer, horizon, keep, seed)
    return out


def summary_line(name: str, q: dict) -> str:
    layers = np.array([v[0] for v in q["per_layer"].values()])
    return (f"| {name} | {q['precision']:.3f} | {q['recall']:.3f} | {layers.mean():.3f} | {layers.min():.3f} | "
            f"{layers.max():.3f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs = args.trace or [s for s in DEFAULT_TRACES if Path(s.split("#")[0]).exists()]
    if not specs:
        print("predictor_quality.py: error: no --trace given and ../shared/traces is absent", file=sys.stderr)
        return 2
    try:
        path = Path(args.predictor) if args.predictor else shipped_predictor_path()
        net, _ = load_set_predictor(path)
        if args.horizon < 1:
            raise UsageError(f"--horizon must be >= 1, not {args.horizon}")
        results = [quality_of(s, NumpyScorer(net), args.tables, args.max_samples, args.seed, args.horizon)
                   for s in specs]  # fmt: skip
    except MoeEnvError as exc:
        print(f"predictor_quality.py: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json_safe(results), indent=1))
        return 0
    print(f"predictor: {path}")
    for r in results:
        q = r["quality"]
        k = r["shape"][2]
        any_method = next(iter(q.values()))
        print(
            f"\n{r['trace']}: (layers, experts, top-k) = {r['shape']}, model tables: {r['tables']}, "
            f"{any_method['samples']} decisions, token known to the table in {any_method['token_known']:.0%}"
        )
        print(f"\n| method (top-{k} of layer l+1) | precision@{k} | recall@{k} | mean over layers | min | max |")
        print("|---|---|---|---|---|---|")
        for name in METHODS:
            if name in q:
                print(summary_line(name, q[name]))
        if args.per_layer:
            print(f"\n| layer | {' | '.join(METHODS)} |")
            print("|---|" + "---|" * len(METHODS))
            for layer in sorted(q["predictor"]["per_layer"]):
                cells = " | ".join(f"{q[m]['per_layer'][layer][0]:.3f}" for m in METHODS)
                print(f"| {layer} | {cells} |")
        if "ahead" in r:
            print(f"\n| layers ahead | {' | '.join(AHEAD_METHODS)} | (t, l) cells |")
            print("|---|" + "---|" * (len(AHEAD_METHODS) + 1))
            for d, row in r["ahead"].items():
                cells = " | ".join(f"{row[m]:.3f}" for m in AHEAD_METHODS)
                print(f"| {d} | {cells} | {row['cells']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
