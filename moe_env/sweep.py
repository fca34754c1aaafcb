"""Replay sweeps: cells (trace x policy x prefetch x slots) run serially or as Ray tasks, with identical results.

A cell's metrics are a merge of ``moe_env.sim.SimTally`` shards: counters add and each time is ``math.fsum`` of
per-sequence values, so a cell's row does not depend on how it was cut. A cell whose policy (and prefetcher)
declares ``independent_sequences`` is cut into shards of whole sequences, balanced by accesses, so that even one
long trace keeps every worker busy; a cell with state across sequences (random's stream, affinity's learned
counts) runs as one task, in trace order.

Ray is optional (``pip install 'moe-env[ray]'``): ``RayRunner(workers=N)`` starts a local Ray with N CPUs,
``RayRunner(address=ADDR)`` joins a running cluster (every node needs moe-env and the plug-ins installed).
Traces travel through Ray's object store once per run, not once per task.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from moe_env.costmodel import CostModel
from moe_env.errors import MoeEnvError, UsageError
from moe_env.policy import Policy, build_policy
from moe_env.sim import SimResult, SimTally, as_allocation, replay
from moe_env.trace import Trace

RAY_EXTRA = "pip install 'moe-env[ray]'"


@dataclass(frozen=True)
class Cell:
    """One replay of a sweep; ``prefetch`` is "none" for demand only."""

    policy: str
    prefetch: str
    slots: int


@dataclass(frozen=True)
class Shard:
    """One task: a cell over some sequences of a trace (None: all of them)."""

    cell: Cell
    sequences: tuple[int, ...] | None


def build_cell_policy(cell: Cell) -> Policy:
    return build_policy(cell.policy, None if cell.prefetch == "none" else cell.prefetch)


def run_shard(trace: Trace, cost: CostModel, shard: Shard) -> SimTally:
    """The work of one task (what a Ray worker runs): a fresh policy, the shard's sequences, their tally."""
    return replay(trace, build_cell_policy(shard.cell), shard.cell.slots, cost, shard.sequences)


def shard_sequences(trace: Trace, shards: int) -> list[tuple[int, ...]]:
    """At most `shards` contiguous runs of sequence indices with about equal decode accesses each."""
    sizes = np.array([int((s.experts[:, :, 0] >= 0).sum()) + 1 for s in trace.sequences], dtype=np.float64)
    shards = max(1, min(shards, len(sizes)))
    bounds = np.searchsorted(np.cumsum(sizes), sizes.sum() * np.arange(1, shards) / shards, side="right")
    edges = [0, *sorted(set(bounds.tolist()) - {0, len(sizes)}), len(sizes)]
    return [tuple(range(a, b)) for a, b in itertools.pairwise(edges)]


class Runner(Protocol):
    """Runs shards of one trace; ``parallelism`` is how many tasks it runs at once."""

    parallelism: int

    def run(self, trace: Trace, cost: CostModel, shards: Sequence[Shard]) -> list[SimTally]: ...

    def close(self) -> None: ...


class SerialRunner:
    """Every shard in this process, one after the other."""

    parallelism = 1

    def run(self, trace: Trace, cost: CostModel, shards: Sequence[Shard]) -> list[SimTally]:
        with replay_progress(len(shards)) as bar:
            tallies = []
            for shard in shards:
                tallies.append(run_shard(trace, cost, shard))
                bar.update()
            return tallies

    def close(self) -> None:
        return None


def replay_progress(total: int) -> tqdm:
    """A bar of replays on stderr, on a terminal only (long bench runs; logs and --json pipes stay clean)."""
    return tqdm(total=total, desc="replays", unit="replay", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())  # fmt: skip


# A local Ray's workers at the caller's own priority: Ray renices its workers by 15 by default, so next to any
# other job they got a fraction of a core and a sweep over --workers ran slower than the serial one (README).
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0}


def import_ray(option: str) -> Any:
    """Ray, or a one-line UsageError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"{option} needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


class RayRunner:
    """Shards as Ray tasks (one CPU each) on a local Ray (``workers``) or a cluster (``address``)."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        check_runner_options(workers, address)
        self._ray = ray = import_ray("--ray-address" if address else "--workers")
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=workers, object_store_memory=1 << 30, _system_config=LOCAL_RAY_SYSTEM_CONFIG,
                     **options)  # fmt: skip
        self.parallelism = max(1, int(ray.cluster_resources().get("CPU", workers or 1)))
        self._task = ray.remote(num_cpus=1)(run_shard)
        self._refs: dict[int, tuple[Any, Any, Any, Any]] = {}  # id(trace) -> (trace, ref, cost, ref)

    def _put(self, trace: Trace, cost: CostModel) -> tuple[Any, Any]:
        held = self._refs.get(id(trace))
        if held is None or held[2] is not cost:
            held = (trace, self._ray.put(trace), cost, self._ray.put(cost))
            self._refs[id(trace)] = held
        return held[1], held[3]

    def run(self, trace: Trace, cost: CostModel, shards: Sequence[Shard]) -> list[SimTally]:
        trace_ref, cost_ref = self._put(trace, cost)
        pending = [self._task.remote(trace_ref, cost_ref, shard) for shard in shards]
        try:
            with replay_progress(len(pending)) as bar:
                remaining = list(pending)
                while remaining:  # wait for any, to move the bar; results are read in submission order
                    done, remaining = self._ray.wait(remaining, num_returns=1)
                    bar.update(len(done))
            return self._ray.get(pending)
        except self._ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, MoeEnvError):  # a bad spec or a buggy plug-in: its own one-line error
                raise exc.cause from None
            raise

    def close(self) -> None:
        self._ray.shutdown()


def check_runner_options(workers: int | None, address: str | None) -> None:
    """Fail fast, before any work: a bad --workers, or Ray asked for but not installed."""
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if workers is not None or address is not None:
        import_ray("--ray-address" if address else "--workers")


def make_runner(workers: int | None = None, address: str | None = None) -> Runner:
    """Serial without either option; Ray otherwise."""
    if workers is None and address is None:
        return SerialRunner()
    return RayRunner(workers, address)


class Sweep:
    """Memoised cells of one trace under one cost model, computed in batches through a Runner."""

    def __init__(self, trace: Trace, cost: CostModel, runner: Runner | None = None):
        self.trace = trace
        self.cost = cost
        self.runner = runner or SerialRunner()
        self._results: dict[Cell, SimResult] = {}
        self._policies: dict[tuple[str, str], tuple[str, bool]] = {}  # -> (name, independent_sequences)

    def _policy(self, cell: Cell) -> tuple[str, bool]:
        key = (cell.policy, cell.prefetch)
        if key not in self._policies:
            policy = build_cell_policy(cell)
            self._policies[key] = (policy.name, policy.independent_sequences)
        return self._policies[key]

    def shardable(self, cell: Cell) -> bool:
        return self._policy(cell)[1]

    def shards(self, cell: Cell) -> list[Shard]:
        if self.runner.parallelism == 1 or not self.shardable(cell):
            return [Shard(cell, None)]
        return [Shard(cell, run) for run in shard_sequences(self.trace, self.runner.parallelism)]

    def compute(self, cells: Iterable[Cell]) -> None:
        """Compute every cell not yet known, all shards of all of them in one batch."""
        todo = [c for c in dict.fromkeys(cells) if c not in self._results]
        if not todo:
            return
        shards = [shard for cell in todo for shard in self.shards(cell)]
        tallies = self.runner.run(self.trace, self.cost, shards)
        by_cell: dict[Cell, list[SimTally]] = {cell: [] for cell in todo}
        for shard, tally in zip(shards, tallies, strict=True):
            by_cell[shard.cell].append(tally)
        for cell, parts in by_cell.items():
            name = self._policy(cell)[0]
            allocation = as_allocation(self.trace.meta, cell.slots)
            self._results[cell] = SimTally.merge(parts).result(name, allocation, self.cost.name, False, "chunked")

    def result(self, cell: Cell) -> SimResult:
        self.compute([cell])
        return self._results[cell]
