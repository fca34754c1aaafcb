"""How an expert-cache budget is laid out: budgets (bytes, a fraction, total slots) and allocations across layers.

Every expert of a model has the same packed size, so a byte budget is a whole number of slots. An ``Allocation``
is a set of slot pools and the pool each layer draws from:

- ``uniform``: one pool per layer, the same slots in each (``--cache-slots K`` is uniform with K per layer);
- ``shared``: one pool for all layers; the policy ranks victims among every layer's candidates;
- ``profile:TRACE``: one pool per layer, sized from the per-layer LRU hit curves of a training trace by
  utility-based partitioning (M. K. Qureshi and Y. N. Patt, "Utility-Based Cache Partitioning", MICRO 2006:
  the lookahead algorithm, which handles curves that are not concave).

The allocation is the cache's; the choice of a victim within a pool stays the policy's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moe_env.errors import UsageError

if TYPE_CHECKING:  # moe_env.trace imports the cache, which imports this module
    from moe_env.trace import Trace

ALLOCATIONS = ("uniform", "shared", "profile")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)
_FRACTION = re.compile(r"^\s*(\d*\.\d+|\d+\.)\s*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_SLOTS = re.compile(r"^\s*(\d+)\s*$")
BUDGET_SYNTAX = (
    "a byte size with a unit (6GiB, 512MB), a fraction of all expert bytes with a decimal point or a percent sign "
    "(0.25, 25%), or a whole number of slots in all layers together (96)"
)
BUDGET_SYNTAX_HELP = BUDGET_SYNTAX.replace("%", "%%")  # argparse expands % in help strings


@dataclass(frozen=True)
class Budget:
    """A parsed ``--cache-budget``: exactly one of bytes, fraction, slots is set."""

    text: str
    bytes: int | None = None
    fraction: float | None = None
    slots: int | None = None

    def total_slots(self, num_layers: int, num_experts: int, expert_bytes: int) -> int:
        """Slots in all layers together (whole experts that fit), clamped to every expert of the model."""
        everything = num_layers * num_experts
        if self.slots is not None:
            return min(self.slots, everything)
        if self.fraction is not None:
            return min(int(self.fraction * everything + 1e-9), everything)
        if expert_bytes <= 0:
            raise UsageError(f"cache budget {self.text!r} is in bytes but the expert size is unknown")
        return min(int(self.bytes // expert_bytes), everything)


def parse_budget(text: str) -> Budget:
    """``6GiB`` -> bytes, ``0.25`` or ``25%`` -> fraction of all expert bytes, ``96`` -> total slots."""
    value = str(text)
    if m := _BYTES.match(value):
        return Budget(value, bytes=int(float(m.group(1)) * _UNITS[m.group(2).lower()]))
    fraction = None
    if m := _FRACTION.match(value):
        fraction = float(m.group(1))
    elif m := _PERCENT.match(value):
        fraction = float(m.group(1)) / 100.0
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise UsageError(f"cache budget {value!r}: a fraction must lie in (0, 1]")
        return Budget(value, fraction=fraction)
    if m := _SLOTS.match(value):
        if int(m.group(1)) < 1:
            raise UsageError(f"cache budget {value!r}: at least one slot")
        return Budget(value, slots=int(m.group(1)))
    raise UsageError(f"cannot read cache budget {value!r}: give {BUDGET_SYNTAX}")


@dataclass(frozen=True)
class Allocation:
    """Slot pools and the pool of each layer. ``layer_slots(l)`` is the most slots layer l can hold at once."""

    kind: str
    pool_slots: tuple[int, ...]
    layer_pool: tuple[int, ...]
    num_experts: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_pool)

    @property
    def total_slots(self) -> int:
        return sum(self.pool_slots)

    @property
    def shared(self) -> bool:
        return len(self.pool_slots) < self.num_layers

    def layer_slots(self, layer: int) -> int:
        return min(self.pool_slots[self.layer_pool[layer]], self.num_experts)

    def share(self, layer: int) -> int:
        """The slots a layer may call its own: its pool's slots divided among the layers that draw from it."""
        pool = self.layer_pool[layer]
        return max(1, self.pool_slots[pool] // self.layer_pool.count(pool))

    def describe(self) -> str:
        if self.kind == "uniform":
            return f"uniform {self.pool_slots[0]} x {self.num_layers} layers"
        if self.shared:
            return f"shared {self.total_slots} slots"
        return f"{self.kind} {'/'.join(map(str, self.pool_slots))}"

    @classmethod
    def uniform(cls, num_layers: int, num_experts: int, slots: int) -> Allocation:
        return cls("uniform", (slots,) * num_layers, tuple(range(num_layers)), num_experts)

    @classmethod
    def one_pool(cls, num_layers: int, num_experts: int, slots: int) -> Allocation:
        return cls("shared", (slots,), (0,) * num_layers, num_experts)

    @classmethod
    def per_layer(cls, kind: str, num_experts: int, slots: Sequence[int]) -> Allocation:
        return cls(kind, tuple(int(s) for s in slots), tuple(range(len(slots))), num_experts)

    def check(self, top_k: int) -> None:
        """Every layer must be able to hold one token's experts at once."""
        low = min(self.layer_slots(layer) for layer in range(self.num_layers))
        if low < top_k:
            raise UsageError(
                f"cache allocation {self.describe()} gives a layer {low} slots: each layer needs top-k={top_k} "
                "(one token's experts) at once; raise the budget"
            )


def hit_curves(layer_streams: Iterable[Sequence[Sequence[int]]], num_layers: int, num_experts: int) -> np.ndarray:
    """[num_layers, num_experts + 1] LRU hits with s slots (s = 0..E), from stack distances (Mattson et al. 1970).

    ``layer_streams`` yields, per request, the per-layer access lists ``streams[layer] = [e, e, ...]`` in order;
    each request starts cold (its first access of an expert misses at every size).
    """
    depth_counts = np.zeros((num_layers, num_experts + 1), dtype=np.int64)
    for streams in layer_streams:
        for layer in range(num_layers):
            stack: list[int] = []  # most recent last
            counts = depth_counts[layer]
            for expert in streams[layer]:
                if expert in stack:
                    depth = len(stack) - stack.index(expert)  # 1 = most recently used
                    counts[depth] += 1
                    stack.remove(expert)
                stack.append(expert)
    return np.cumsum(depth_counts, axis=1)  # hits(s) = accesses with stack depth <= s


def partition(curves: np.ndarray | list[list[int]], total: int, minimum: int) -> list[int]:
    """UCP lookahead: start each layer at `minimum`, then give slots where they buy the most hits per slot."""
    num_layers, sizes = len(curves), len(curves[0])
    most = sizes - 1
    curves = np.asarray(curves).tolist()  # plain ints: this loop indexes them ~L x E times per step
    alloc = [minimum] * num_layers
    remaining = total - minimum * num_layers
    if remaining < 0:
        raise UsageError(f"budget of {total} slots is below {minimum} per layer x {num_layers} layers")
    while remaining > 0:
        best: tuple[float, int, int] | None = None  # (utility per slot, -extra, layer): highest wins
        for layer in range(num_layers):
            have = alloc[layer]
            for extra in range(1, min(remaining, most - have) + 1):
                utility = (curves[layer][have + extra] - curves[layer][have]) / extra
                candidate = (float(utility), -extra, -layer)
                if best is None or candidate > best:
                    best = candidate
        if best is None:
            break  # every layer holds all its experts
        alloc[-best[2]] += -best[1]
        remaining += best[1]
    return alloc


def trace_streams(trace: Trace) -> Iterable[list[list[int]]]:
    """Per sequence, each layer's decode accesses in order (what hit_curves reads)."""
    for sequence in trace.sequences:
        streams = []
        for layer in range(trace.meta.num_layers):
            rows = sequence.experts[:, layer]
            streams.append(rows[rows[:, 0] >= 0].reshape(-1).tolist())
        yield streams


def fit_profile(trace: Trace, total: int) -> Allocation:
    """``profile``: `total` slots split across layers by UCP on the LRU hit curves of (training) `trace`."""
    meta = trace.meta
    curves = hit_curves(trace_streams(trace), meta.num_layers, meta.num_experts)
    slots = partition(curves, min(total, meta.num_layers * meta.num_experts), meta.top_k)
    return Allocation.per_layer("profile", meta.num_experts, slots)


def build_allocation(
    spec: str, total: int, num_layers: int, num_experts: int, top_k: int, load: Callable[[str], Trace]
) -> Allocation:
    """``uniform`` (total // layers each), ``shared`` or ``profile:TRACE`` (`load` reads the training trace)."""
    kind, _, argument = spec.strip().partition(":")
    if kind == "uniform" and not argument:
        allocation = Allocation.uniform(num_layers, num_experts, min(total // num_layers, num_experts))
    elif kind == "shared" and not argument:
        allocation = Allocation.one_pool(num_layers, num_experts, total)
    elif kind == "profile" and argument:
        trace = load(argument)
        shape = (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k)
        if shape != (num_layers, num_experts, top_k):
            raise UsageError(
                f"profile trace {argument!r} has {shape[0]} layers x {shape[1]} experts, top-{shape[2]}; the model "
                f"has {num_layers} x {num_experts}, top-{top_k}"
            )
        allocation = fit_profile(trace, total)
    else:
        raise UsageError(f"unknown cache allocation {spec!r}; use uniform, shared or profile:TRACE")
    allocation.check(top_k)
    return allocation
