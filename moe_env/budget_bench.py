"""Policies x allocations at equal total budgets, and memory at equal hit rate at slot (= byte) granularity.

``moe-env bench --cache-budget ... --allocation ...`` runs this: every (policy, prefetch, allocation) at every total
budget, cold or warm, and for each the fewest bytes that reach LRU-uniform's hit rate at the reference budget. A
uniform allocation moves in whole slots per layer (steps of num_layers slots); shared and profile move one slot
(one expert's bytes) at a time. Every probe of the search is a whole replay, so it takes few (``least_meeting``:
a bracket grown from the reference budget, shrunk by interpolation on the hit-rate curve with a bisection
safeguard); hit rate is near-monotone in the budget, and the answer is locally minimal (one step less misses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np

from moe_env.allocation import Allocation, hit_curves, parse_budget, partition, trace_streams
from moe_env.bench_rows import bench_row
from moe_env.errors import UsageError
from moe_env.policy import make_policy
from moe_env.sim import SimResult, cost_model_for, simulate
from moe_env.trace import Trace

REFERENCE = ("lru", "none", "uniform")  # what "equal hit rate" is measured against


@dataclass(frozen=True)
class BudgetRow:
    trace: str
    policy: str
    prefetch: str
    allocation: str
    layout: Allocation
    expert_bytes: int
    result: SimResult

    @property
    def total_slots(self) -> int:
        return self.layout.total_slots

    @property
    def bytes(self) -> int:
        return self.layout.total_slots * self.expert_bytes

    def as_dict(self) -> dict:
        pools = self.layout.pool_slots
        slots = pools[0] if len(set(pools)) == 1 and not self.layout.shared else None  # the same in every layer
        return bench_row(self.trace, self.policy, self.prefetch, self.result, allocation=self.allocation,
                         slots=slots, expert_bytes=self.expert_bytes)  # fmt: skip


@dataclass(frozen=True)
class IsoBytes:
    """Fewest bytes for (policy, prefetch, allocation) to reach LRU-uniform's hit rate at `reference_slots`."""

    trace: str
    policy: str
    prefetch: str
    allocation: str
    reference_slots: int
    reference_bytes: int
    target_hit_rate: float
    slots_needed: int | None  # None: not reached even with every expert resident
    bytes_needed: int | None

    @property
    def saving(self) -> float | None:
        """Fraction of the reference bytes saved (negative: needs more)."""
        return None if self.bytes_needed is None else 1.0 - self.bytes_needed / self.reference_bytes

    def as_dict(self) -> dict:
        return {**self.__dict__, "saving": self.saving}


def check_ranks_across_layers(policies: list[str]) -> None:
    """A shared pool compares eviction scores across layers: only policies that declare ``ranks_across_layers``
    run there (the cache refuses the others when it is built; this says so before the first replay)."""
    for spec in policies:
        if not make_policy(spec).ranks_across_layers:
            raise UsageError(
                f"--allocation shared: policy {spec!r} does not rank victims across layers (ranks_across_layers is "
                "False); run it with uniform or profile, or leave shared out"
            )


class BudgetBench:
    """Memoised replays of one (evaluation) trace; ``profile:TRACE`` curves are fitted once per training trace."""

    def __init__(
        self,
        label: str,
        trace: Trace,
        profile: str | None,
        warm: bool,
        prefill: str,
        load: Callable[[str], Trace],
    ):
        self.label = label
        self.trace = trace
        self.cost = cost_model_for(trace.meta, profile)
        self.warm = warm
        self.prefill = prefill
        self._load = load
        self._curves: dict[str, np.ndarray] = {}
        self._layouts: dict[tuple[str, int], Allocation] = {}
        self._results: dict[tuple[str, str, str, int], SimResult] = {}
        meta = trace.meta
        self.num_layers, self.num_experts, self.top_k = meta.num_layers, meta.num_experts, meta.top_k

    def total_slots(self, budget: str) -> int:
        return parse_budget(budget).total_slots(self.num_layers, self.num_experts, self.cost.expert_bytes)

    def step(self, allocation: str) -> int:
        return self.num_layers if allocation == "uniform" else 1

    def lowest(self, allocation: str) -> int:
        return self.top_k if allocation == "shared" else self.top_k * self.num_layers

    def layout(self, allocation: str, total: int) -> Allocation:
        key = (allocation, total)
        if key not in self._layouts:
            self._layouts[key] = self._layout(allocation, total)
        return self._layouts[key]

    def _layout(self, allocation: str, total: int) -> Allocation:
        kind, _, argument = allocation.partition(":")
        if kind == "uniform" and not argument:
            return Allocation.uniform(
                self.num_layers, self.num_experts, min(total // self.num_layers, self.num_experts)
            )
        if kind == "shared" and not argument:
            return Allocation.one_pool(self.num_layers, self.num_experts, total)
        if kind == "profile" and argument:
            if argument not in self._curves:
                train = self._load(argument)
                shape = (train.meta.num_layers, train.meta.num_experts, train.meta.top_k)
                if shape != (self.num_layers, self.num_experts, self.top_k):
                    raise UsageError(f"profile trace {argument!r} has another shape {shape} than {self.label!r}")
                self._curves[argument] = hit_curves(trace_streams(train), self.num_layers, self.num_experts)
            slots = partition(self._curves[argument], min(total, self.num_layers * self.num_experts), self.top_k)
            return Allocation.per_layer("profile", self.num_experts, slots)
        raise UsageError(f"unknown cache allocation {allocation!r}; use uniform, shared or profile:TRACE")

    def result(self, policy: str, prefetch: str, allocation: str, total: int) -> SimResult:
        key = (policy, prefetch, allocation, total)
        if key not in self._results:
            layout = self.layout(allocation, total)
            layout.check(self.top_k)
            self._results[key] = simulate(
                self.trace, policy, layout, self.cost, None if prefetch == "none" else prefetch,
                prefill=self.prefill, warm=self.warm,
            )  # fmt: skip
        return self._results[key]

    def row(self, policy: str, prefetch: str, allocation: str, total: int) -> BudgetRow:
        result = self.result(policy, prefetch, allocation, total)
        layout = self.layout(allocation, total)
        return BudgetRow(self.label, policy, prefetch, allocation, layout, self.cost.expert_bytes, result)

    def iso_bytes(self, policy: str, prefetch: str, allocation: str, reference: int) -> IsoBytes:
        target = self.result(*REFERENCE, reference)
        reference_used = self.layout("uniform", reference).total_slots
        totals = range(self.lowest(allocation), self.num_layers * self.num_experts + 1, self.step(allocation))
        start = min(max(0, (reference - totals.start) // totals.step), len(totals) - 1)
        if prefetch == "none":
            found = least_meeting(len(totals), lambda i: self.result(policy, prefetch, allocation, totals[i]).hit_rate,
                                  target.hit_rate, start)  # fmt: skip
        else:  # a prefetched "hit" may still wait for its copy: the target is LRU's stall per token
            found = least_meeting(len(totals), lambda i: -self.result(policy, prefetch, allocation, totals[i])
                                  .stall_s_per_token, -target.stall_s_per_token, start)  # fmt: skip
        needed = None if found is None else totals[found]
        used = None if needed is None else self.layout(allocation, needed).total_slots
        return IsoBytes(
            self.label, policy, prefetch, allocation, reference_used, reference_used * self.cost.expert_bytes,
            target.hit_rate, used, None if used is None else used * self.cost.expert_bytes,
        )  # fmt: skip


def least_meeting(count: int, value: Callable[[int], float], target: float, start: int) -> int | None:
    """The least index i in 0..count-1 with value(i) >= target, value near-monotone increasing in i (a hit rate
    against the budget), in few probes (``boundary_search``, each probe a call of `value`)."""
    search = boundary_search(count, target, start)
    try:
        i = next(search)
        while True:
            i = search.send(value(i))
    except StopIteration as done:
        return done.value


def boundary_search(count: int, target: float, start: int) -> Generator[int, float, int | None]:
    """least_meeting as a generator: it yields the index it needs next, is sent that index's value, and returns
    the answer (so a driver can advance many searches together and compute their probes in one parallel batch).
    Each probe is a whole replay, so it takes few: a bracket grows from `start` (the reference budget: the answer
    is usually near it) in doubling steps, then shrinks by the secant through the two latest probes, with a
    bisection whenever a step is not half the one before the last (Brent's safeguard). The answer meets the
    target and the index below it does not (a local minimum where the curve is not monotone); None if even
    count-1 misses. No index is asked for twice."""
    values: dict[int, float] = {}

    def probe(i: int) -> Generator[int, float, float]:
        if i not in values:
            values[i] = yield i
        return values[i]

    miss, meet = (None, start) if (yield from probe(start)) >= target else (start, None)  # below / at the boundary
    step = max(1, count // 32)
    while meet is None:
        i = min(count - 1, miss + step)
        if (yield from probe(i)) >= target:
            meet = i
        elif i == count - 1:
            return None
        else:
            miss, step = i, 2 * step
    while miss is None:
        i = max(0, meet - step)
        if (yield from probe(i)) < target:
            miss = i
        elif i == 0:
            return 0
        else:
            meet, step = i, 2 * step
    latest = list(values)[-2:]  # the secant runs through the two latest probes
    moves: list[int] = []  # how far each shrinking probe moved from the one before
    while meet - miss > 1:
        (i0, v0), (i1, v1) = ((i, values[i]) for i in latest)
        i = (miss + meet) // 2
        if v0 != v1:  # where the secant crosses the target, unless it converges slower than bisection would
            guess = min(max(math.ceil(i1 + (target - v1) * (i1 - i0) / (v1 - v0) - 1e-9), miss + 1), meet - 1)
            if len(moves) < 2 or 2 * abs(guess - i1) <= moves[-2]:
                i = guess
        moves.append(abs(i - i1))
        if (yield from probe(i)) >= target:
            meet = i
        else:
            miss = i
        latest = [i1, i]
    return meet


def print_rows(rows: list[BudgetRow], benches: list[BudgetBench]) -> None:
    for bench in benches:
        mode = "warm (one request stream)" if bench.warm else "cold (each sequence starts empty)"
        print(f"trace {bench.label}: {bench.trace.num_accesses} decode accesses, profile {bench.cost.name}, {mode}, "
              f"prefill {bench.prefill}")  # fmt: skip
    header = ["trace", "policy", "prefetch", "allocation", "slots", "GB", "hit_rate", "first_hits", "stall_ms/tok"]
    table = [header]
    for row in rows:
        r = row.result
        table.append([row.trace, row.policy, row.prefetch, row.allocation, str(row.total_slots),
                      f"{row.bytes / 1e9:.2f}", f"{r.hit_rate:.3f}", f"{r.first_hit_rate:.3f}",
                      f"{1e3 * r.stall_s_per_token:.2f}"])  # fmt: skip
    _print_table(table, left=4)


def print_iso(iso: list[IsoBytes]) -> None:
    if not iso:
        return
    first = iso[0]
    print(f"memory at equal hit rate (LRU uniform's hit rate at {first.reference_slots} slots = "
          f"{first.reference_bytes / 1e9:.2f} GB; uniform moves in whole slots per layer, shared/profile in "
          "single slots; with a prefetcher, LRU's stall per token):")  # fmt: skip
    table = [["trace", "policy", "prefetch", "allocation", "target", "slots", "GB", "saving"]]
    for item in iso:
        needed = "never" if item.slots_needed is None else str(item.slots_needed)
        gb = "-" if item.bytes_needed is None else f"{item.bytes_needed / 1e9:.2f}"
        saving = "-" if item.saving is None else f"{100 * item.saving:+.1f}%"
        table.append([item.trace, item.policy, item.prefetch, item.allocation, f"{item.target_hit_rate:.3f}",
                      needed, gb, saving])  # fmt: skip
    _print_table(table, left=4)


def _print_table(table: list[list[str]], left: int) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        cells = (
            cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        print("  ".join(cells))
