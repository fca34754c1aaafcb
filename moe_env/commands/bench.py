"""`moe-env bench`: replay traces through policies at several cache budgets; table, JSON rows and plots.

LRU and Belady (no prefetch) are always simulated: they anchor ``gap_captured = (hit_rate - lru) / (belady -
lru)`` at the same budget. "Memory at equal hit rate": the fewest slots a policy needs to reach LRU's hit rate at
the reference budget, and what that saves (slots x layers x expert bytes of the profile).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from moe_env.allocation import BUDGET_SYNTAX, BUDGET_SYNTAX_HELP, parse_budget
from moe_env.bench_rows import bench_row
from moe_env.budget_bench import BudgetBench, IsoBytes, boundary_search, check_ranks_across_layers, print_rows
from moe_env.budget_bench import print_iso as print_iso_bytes
from moe_env.cache import PREFILL_MODES
from moe_env.errors import UsageError
from moe_env.outputs import check_writable_dir
from moe_env.policy import check_policy_spec, make_policy
from moe_env.sim import SimResult, check_capacity, cost_model_for
from moe_env.sweep import Cell, Runner, Sweep, check_runner_options, make_runner
from moe_env.trace import Trace, load_trace

BASELINES = ("lru", "belady")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", action="append", required=True, help="trace spec (file, .jsonl, builtin:M[/S])")
    parser.add_argument("--policies", action="append", default=None, help="eviction policies, e.g. lru,lfu,belady")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--cache-slots", default=None, help="slots per layer to compare, e.g. 3,4,5 (default)")
    budget.add_argument("--cache-budget", default=None,
                        help=f"total budgets to compare, comma-separated, each {BUDGET_SYNTAX_HELP}")  # fmt: skip
    parser.add_argument("--allocation", default=None,
                        help="with --cache-budget: layouts, e.g. uniform,shared,profile:TRAIN_TRACE")  # fmt: skip
    parser.add_argument("--warm", action="store_true", help="with --cache-budget: replay the trace as one request "
                        "stream through one cache (default: each sequence starts empty)")  # fmt: skip
    parser.add_argument("--prefill", default="chunked", choices=PREFILL_MODES, help="with --cache-budget: prefill mode")
    parser.add_argument("--reference-budget", default=None, help="with --cache-budget: budget of memory at "
                        "equal hit rate (default: the middle one; none: no search)")  # fmt: skip
    parser.add_argument(
        "--prefetch", default="none", help="prefetchers to cross with the policies, e.g. none,lookahead"
    )
    parser.add_argument(
        "--profile", default=None, help="cost model HARDWARE[:EXPERTS], e.g. consumer-pcie4:olmoe-1b-7b"
    )
    parser.add_argument("--reference-slots", type=int, default=None, help="budget for memory at equal hit rate")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    parser.add_argument("--plots", default=None, help="write PNG plots into this directory (default: no plots)")
    parser.add_argument("--workers", type=int, default=None, help="run cells as tasks on a local Ray with N CPUs")
    parser.add_argument("--ray-address", default=None, help="run cells as tasks on the Ray cluster at ADDR")


def split_specs(values: list[str] | None) -> list[str]:
    """'lru,lfu-decay:decay=0.9,x=1,belady' -> ['lru', 'lfu-decay:decay=0.9,x=1', 'belady']: a piece with '=' and
    no ':' continues the previous spec's arguments."""
    specs: list[str] = []
    for value in values or []:
        for piece in (p.strip() for p in value.split(",")):
            if not piece:
                continue
            if specs and "=" in piece and ":" not in piece:
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def parse_slots(text: str) -> list[int]:
    try:
        slots = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UsageError(f"--cache-slots must be integers separated by commas, got {text!r}") from None
    if not slots:
        raise UsageError("--cache-slots is empty")
    return slots


@dataclass(frozen=True)
class Row:
    trace: str
    policy: str
    prefetch: str
    slots: int
    result: SimResult
    gap_captured: float | None
    expert_bytes: int

    def as_dict(self) -> dict:
        return bench_row(self.trace, self.policy, self.prefetch, self.result, allocation="uniform", slots=self.slots,
                         expert_bytes=self.expert_bytes, gap_captured=self.gap_captured)  # fmt: skip


@dataclass(frozen=True)
class IsoHitRate:
    """Fewest slots for `policy` to match LRU at `reference_slots` (None: never, up to all experts)."""

    trace: str
    policy: str
    prefetch: str
    reference_slots: int
    lru_hit_rate: float
    slots_needed: int | None
    bytes_saved: int | None
    lru_stall_s_per_token: float = float("nan")  # the target of a prefetching combo (see iso_hit_rates)

    def target(self) -> str:
        """What the search matched: LRU's hit rate, or with a prefetcher LRU's stall per token."""
        if self.prefetch == "none":
            return f"{self.lru_hit_rate:.3f}"
        return f"{1e3 * self.lru_stall_s_per_token:.2f} ms/token"


class Bench:
    """Memoised simulations of one trace: (policy, prefetch, slots) -> SimResult, computed by a moe_env.sweep
    Runner (serial, or Ray tasks: the same rows)."""

    def __init__(self, label: str, trace: Trace, profile: str | None, runner: Runner | None = None):
        self.label = label
        self.trace = trace
        self.cost = cost_model_for(trace.meta, profile)
        self.sweep = Sweep(trace, self.cost, runner)

    def result(self, policy: str, prefetch: str, slots: int) -> SimResult:
        return self.sweep.result(Cell(policy, prefetch, slots))

    def compute(self, keys: list[tuple[str, str, int]]) -> None:
        """Compute these (policy, prefetch, slots) in one parallel batch (a no-op for known ones)."""
        self.sweep.compute(Cell(*key) for key in keys)

    def row(self, policy: str, prefetch: str, slots: int) -> Row:
        result = self.result(policy, prefetch, slots)
        lru, belady = (self.result(p, "none", slots).hit_rate for p in BASELINES)
        gap = (result.hit_rate - lru) / (belady - lru) if belady != lru else None
        return Row(self.label, policy, prefetch, slots, result, gap, self.cost.expert_bytes)

    def iso_hit_rate(self, policy: str, prefetch: str, reference: int) -> IsoHitRate:
        return self.iso_hit_rates([(policy, prefetch)], reference)[0]

    def iso_hit_rates(self, combos: list[tuple[str, str]], reference: int) -> list[IsoHitRate]:
        """For each (policy, prefetch) the fewest slots that reach LRU's hit rate at `reference`: a
        moe_env.budget_bench.boundary_search over top_k..num_experts slots from the reference (hit rate is
        near-monotone in slots; where FIFO-like anomalies bend it, a local boundary). The searches advance
        together, each round's probes computed in one batch (in parallel on a Ray runner); every probe is a
        replay, memoised with the table's cells.

        With a prefetcher, "hit" includes accesses whose prefetched copy may still be landing, so the target is
        LRU's stall per token instead (for demand-only policies the two coincide: every miss costs one copy)."""
        meta = self.trace.meta
        lru = self.result("lru", "none", reference)
        slots = range(meta.top_k, meta.num_experts + 1)

        def value(prefetch: str, result: SimResult) -> float:
            return result.hit_rate if prefetch == "none" else -result.stall_s_per_token

        searches: dict[tuple[str, str], Generator[int, float, int | None]] = {}
        asked: dict[tuple[str, str], int] = {}  # each running search's next index
        found: dict[tuple[str, str], int | None] = {}
        for combo in dict.fromkeys(combos):
            target = value(combo[1], lru)
            searches[combo] = boundary_search(len(slots), target, reference - meta.top_k)
            asked[combo] = next(searches[combo])
        while asked:
            self.compute([(policy, prefetch, slots[i]) for (policy, prefetch), i in asked.items()])
            for combo, i in list(asked.items()):
                try:
                    asked[combo] = searches[combo].send(value(combo[1], self.result(*combo, slots[i])))
                except StopIteration as done:
                    found[combo] = None if done.value is None else slots[done.value]
                    del asked[combo]
        rows = []
        for policy, prefetch in combos:
            needed = found[(policy, prefetch)]
            saved = None if needed is None else (reference - needed) * meta.num_layers * self.cost.expert_bytes
            rows.append(IsoHitRate(self.label, policy, prefetch, reference, lru.hit_rate, needed, saved,
                                   lru.stall_s_per_token))  # fmt: skip
        return rows


def given_specs(values: list[str] | None, option: str, default: list[str]) -> list[str]:
    """The specs of an option, `default` when it was not given; given but empty is an error (never the default)."""
    if values is None:
        return default
    specs = split_specs(values)
    if not specs:
        raise UsageError(f"{option} is empty; name at least one, e.g. {option} {','.join(default)}")
    return specs


def check_specs(policies: list[str], prefetchers: list[str]) -> None:
    """Bad specs, wrong roles and bad arguments fail before any replay (each policy is built once, then dropped)."""
    for spec in policies:
        check_policy_spec(spec, role="policy")
        make_policy(spec)
    for spec in prefetchers:
        check_policy_spec(spec, role="prefetch")
        if spec != "none":
            make_policy(spec)


def run(args: argparse.Namespace) -> int:
    policies = given_specs(args.policies, "--policies", ["lru", "lfu", "belady"])
    prefetchers = given_specs([args.prefetch], "--prefetch", ["none"])
    if args.cache_budget is not None:
        return run_budgets(args, policies, prefetchers)
    if args.allocation is not None or args.warm or args.prefill != "chunked" or args.reference_budget is not None:
        raise UsageError("--allocation, --warm, --prefill and --reference-budget go with --cache-budget")
    slots = parse_slots(args.cache_slots if args.cache_slots is not None else "3,4,5")
    if min(slots) < 1:
        raise UsageError(f"--cache-slots must be positive, got {args.cache_slots!r}")
    if args.reference_slots is not None and args.reference_slots < 1:
        raise UsageError(f"--reference-slots must be positive, got {args.reference_slots}")
    check_specs(policies, prefetchers)
    check_runner_options(args.workers, args.ray_address)
    plots_dir = None if args.plots is None else check_writable_dir(args.plots, "--plots")
    traces = [(spec, load_trace(spec)) for spec in args.trace]
    reference = args.reference_slots if args.reference_slots is not None else slots[len(slots) // 2]
    for _, trace in traces:
        for s in [*slots, reference]:
            check_capacity(trace.meta, s)
        cost_model_for(trace.meta, args.profile)  # an unknown profile fails before any replay
    combos = [(p, f) for p in policies for f in prefetchers]
    rows: list[Row] = []
    iso: list[IsoHitRate] = []
    benches: list[Bench] = []
    runner = make_runner(args.workers, args.ray_address)
    try:
        for spec, trace in traces:
            bench = Bench(spec, trace, args.profile, runner)
            benches.append(bench)
            bench.compute([(p, f, s) for s in slots for p, f in [*((b, "none") for b in BASELINES), *combos]])
            rows += [bench.row(p, f, s) for s in slots for p, f in combos]
            iso += bench.iso_hit_rates(combos, reference)
    finally:
        runner.close()
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=1))
    else:
        print_table(rows, benches)
        print()
        print_iso(iso, benches)
    if plots_dir is not None:
        written = [p for bench in benches for p in plot_bench(bench, combos, slots, plots_dir)]
        if not args.json:
            print(f"\nplots: {', '.join(str(p) for p in written)}")
    return 0


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row], benches: list[Bench]) -> None:
    for bench in benches:
        print(f"trace {bench.label}: {bench.trace.num_accesses} decode accesses, profile {bench.cost.name}")
    header = ["trace", "policy", "prefetch", "slots", "hit_rate", "gap", "pf_prec", "pf_recall", "GB_moved",
              "stall_ms/tok", "tok/s"]  # fmt: skip
    table = [header]
    for row in rows:
        r = row.result
        table.append([
            row.trace, row.policy, row.prefetch, str(row.slots), f"{r.hit_rate:.3f}", _fmt(row.gap_captured, ".2f"),
            f"{r.prefetch_precision:.2f}", f"{r.prefetch_recall:.2f}", f"{r.bytes_moved / 1e9:.1f}",
            f"{1e3 * r.stall_s_per_token:.2f}", f"{r.tokens_per_s:.2f}",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print(
            "  ".join(
                cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
    if any(row.prefetch != "none" for row in rows):
        print("with a prefetcher, hit_rate counts accesses served by a prefetched copy (which may still stall):")
        print("compare stall per token; gap_captured compares hit rates only")


def print_iso(iso: list[IsoHitRate], benches: list[Bench]) -> None:
    if not iso:
        return
    print(
        f"memory at equal hit rate (LRU's hit rate at {iso[0].reference_slots} slots; with a prefetcher, LRU's "
        "stall per token):"
    )
    for item in iso:
        needed = "never" if item.slots_needed is None else f"{item.slots_needed} slots"
        saved = "-" if item.bytes_saved is None else f"{item.bytes_saved / 1e9:+.2f} GB saved"
        print(
            f"  {item.trace}  {item.policy:<24} {item.prefetch:<10} target {item.target()}: {needed}, {saved}"
        )


def plot_bench(bench: Bench, combos: list[tuple[str, str]], slots: list[int], out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure  # Agg through Figure.savefig: no pyplot, no global backend

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(bench.label).stem if ":" not in bench.label else bench.label)
    lines = list(dict.fromkeys([*((p, "none") for p in BASELINES), *combos]))
    written = []
    for metric, label, scale in (("hit_rate", "hit rate", 1.0), ("stall_s_per_token", "stall per token (ms)", 1e3)):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for policy, prefetch in lines:
            ys = [scale * getattr(bench.result(policy, prefetch, s), metric) for s in slots]
            ax.plot(slots, ys, marker="o", label=policy if prefetch == "none" else f"{policy}+{prefetch}")
        ax.set_xticks(slots)
        ax.set_xlabel("cache slots per layer")
        ax.set_ylabel(label)
        ax.set_title(f"{bench.label} ({bench.cost.name})", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out_dir / f"{stem}-{metric.replace('_', '-')}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        written.append(path)
    return written


def run_budgets(args: argparse.Namespace, policies: list[str], prefetchers: list[str]) -> int:
    """Policies x allocations at equal total budgets (moe_env.budget_bench)."""
    budgets = [piece.strip() for piece in args.cache_budget.split(",") if piece.strip()]
    if not budgets:
        raise UsageError(f"--cache-budget is empty; give {BUDGET_SYNTAX}")
    for budget in [*budgets, *([args.reference_budget] if args.reference_budget not in (None, "none") else [])]:
        parse_budget(budget)
    allocations = given_specs([args.allocation] if args.allocation else None, "--allocation", ["uniform"])
    if args.plots is not None:
        raise UsageError("--plots goes with --cache-slots (budget sweeps print tables and JSON)")
    if args.workers is not None or args.ray_address is not None:
        # warm streams are not independent per sequence, and budget cells are not yet Ray tasks: say so
        raise UsageError("--workers/--ray-address go with --cache-slots; --cache-budget sweeps run serially")
    check_specs(policies, prefetchers)
    if any(a.strip() == "shared" for a in allocations):
        check_ranks_across_layers(policies)  # before any replay: a learned policy is refused, not half-measured
    traces = [(spec, load_trace(spec)) for spec in args.trace]
    benches = [BudgetBench(spec, trace, args.profile, args.warm, args.prefill, load_trace) for spec, trace in traces]
    combos = [(p, f, a) for p in policies for f in prefetchers for a in allocations]
    for bench in benches:  # layouts (and profile traces) fail before any replay
        for budget in budgets:
            for allocation in allocations:
                bench.layout(allocation, bench.total_slots(budget)).check(bench.top_k)
    rows = []
    iso: list[IsoBytes] = []
    for bench in benches:
        totals = [bench.total_slots(b) for b in budgets]
        rows += [bench.row(p, f, a, t) for t in totals for p, f, a in combos]
        if args.reference_budget == "none":
            continue  # no search for memory at equal hit rate (slow policies: a table at the budgets only)
        reference = bench.total_slots(args.reference_budget) if args.reference_budget else totals[len(totals) // 2]
        iso += [bench.iso_bytes(p, f, a, reference) for p, f, a in combos]
    if args.json:
        print(json.dumps({"rows": [r.as_dict() for r in rows], "memory_at_equal_hit_rate": [i.as_dict() for i in iso]},
                         indent=1))  # fmt: skip
    else:
        print_rows(rows, benches)
        print()
        print_iso_bytes(iso)
    return 0
