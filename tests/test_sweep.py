"""Sweeps: sharded replays merge into exactly the unsharded replay; Ray gives the serial rows; no Ray, one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moe_env.cli import main
from moe_env.sim import SimTally, as_allocation, cost_model_for, replay, simulate
from moe_env.sweep import Cell, SerialRunner, Sweep, shard_sequences
from moe_env.trace import load_trace

TRACE = "builtin:tiny-mixtral/eval"
CELLS = [
    Cell("lru", "none", 4),  # fast kernel
    Cell("belady", "none", 3),  # fast kernel with the future
    Cell("lfu-decay:decay=0.9", "none", 4),  # general path
    Cell("lru", "lookahead", 4),  # prefetch: timing crosses layers
    Cell("lfuda", "oracle", 5),  # the future through prefetch
]


class InProcessShards(SerialRunner):
    """Cuts cells as a parallel runner would, runs them here (the shard logic without Ray)."""

    def __init__(self, parallelism: int):
        self.parallelism = parallelism


@pytest.fixture(scope="module")
def trace():
    return load_trace(TRACE)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.policy}+{c.prefetch}@{c.slots}")
def test_sharded_replay_is_the_whole_replay(trace, cell):
    expected = simulate(trace, cell.policy, cell.slots, None, None if cell.prefetch == "none" else cell.prefetch)
    for parallelism in (2, 5, len(trace.sequences)):
        sweep = Sweep(trace, cost_model_for(trace.meta, None), InProcessShards(parallelism))
        assert len(sweep.shards(cell)) == min(parallelism, len(trace.sequences))
        assert sweep.result(cell) == expected, parallelism  # every field, floats to the bit


def test_merge_order_does_not_change_a_bit(trace):
    cost = cost_model_for(trace.meta, None)
    policy = Sweep(trace, cost).shards(CELLS[3])[0]
    from moe_env.sweep import build_cell_policy

    parts = [replay(trace, build_cell_policy(policy.cell), 4, cost, [i]) for i in range(len(trace.sequences))]
    allocation = as_allocation(trace.meta, 4)
    forward = SimTally.merge(parts).result("x", allocation, cost.name, False, "chunked")
    backward = SimTally.merge(parts[::-1]).result("x", allocation, cost.name, False, "chunked")
    assert forward == backward
    assert forward.stall_s > 0 and forward.hits + forward.misses == trace.num_accesses


@pytest.mark.parametrize("cell", [Cell("random:seed=0", "none", 4), Cell("lru", "affinity", 4)])
def test_state_across_sequences_is_never_cut(trace, cell):
    sweep = Sweep(trace, cost_model_for(trace.meta, None), InProcessShards(4))
    assert not sweep.shardable(cell)
    assert [s.sequences for s in sweep.shards(cell)] == [None]
    expected = simulate(trace, cell.policy, cell.slots, None, None if cell.prefetch == "none" else cell.prefetch)
    assert sweep.result(cell) == expected


def test_shards_cover_every_sequence_once_and_balance(trace):
    sizes = [int((s.experts[:, :, 0] >= 0).sum()) + 1 for s in trace.sequences]
    for shards in (1, 2, 3, 7, 100):
        runs = shard_sequences(trace, shards)
        assert [i for run in runs for i in run] == list(range(len(trace.sequences)))
        assert 1 <= len(runs) <= min(shards, len(trace.sequences)) and all(runs)
        # no shard exceeds its fair share by more than one sequence
        assert max(sum(sizes[i] for i in run) for run in runs) <= sum(sizes) / len(runs) + max(sizes)
    assert len(shard_sequences(trace, 4)) == 4


BENCH = ["bench", "--trace", TRACE, "--policies", "lru,lfu-decay:decay=0.9,random:seed=1", "--prefetch",
         "none,affinity", "--cache-slots", "3,5", "--json"]  # fmt: skip


def test_bench_on_local_ray_gives_the_serial_rows(capsys):
    pytest.importorskip("ray")
    assert main(BENCH) == 0
    serial = json.loads(capsys.readouterr().out)
    assert main([*BENCH, "--workers", "2"]) == 0
    parallel = json.loads(capsys.readouterr().out)
    assert len(serial) == 3 * 2 * 2
    assert parallel == serial


def test_an_error_inside_a_ray_task_is_the_library_error(trace):
    pytest.importorskip("ray")
    from moe_env.errors import UsageError
    from moe_env.sweep import RayRunner

    runner = RayRunner(workers=2)
    try:
        sweep = Sweep(trace, cost_model_for(trace.meta, None), runner)
        with pytest.raises(UsageError, match="cache slots 99 outside") as caught:
            sweep.result(Cell("lru", "none", 99))
        assert type(caught.value) is UsageError  # not Ray's wrapper with a remote traceback in its text
        # the local Ray's workers run at the caller's priority (Ray's default renices them by 15)
        import os

        import ray

        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)
    finally:
        runner.close()


NO_RAY = """
    import sys

    class BlockRay:  # this interpreter behaves as if Ray were not installed
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, BlockRay())
"""


def test_workers_without_ray_is_one_line_naming_the_extra(tmp_path: Path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(NO_RAY))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    command = [sys.executable, "-m", "moe_env.cli", *BENCH, "--workers", "2", "--plots", str(tmp_path / "plots")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pip install 'moe-env[ray]'" in lines[0] and "--workers" in lines[0]
    assert not (tmp_path / "plots").exists()
