"""Memory at equal hit rate: the search over budgets (few probes, exact answer) and the bench's row schema."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_env.budget_bench import least_meeting


def _counted(values: list[float]):
    probes: list[int] = []

    def value(i: int) -> float:
        probes.append(i)
        return values[i]

    return value, probes


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=300), data=st.data())
def test_least_meeting_finds_the_least_index_of_a_monotone_curve(steps, data):
    values = np.cumsum(steps).tolist()  # non-decreasing, flat stretches included
    target = data.draw(st.floats(-1.0, values[-1] + 1.0))
    start = data.draw(st.integers(0, len(values) - 1))
    value, probes = _counted(values)
    expected = next((i for i, v in enumerate(values) if v >= target), None)
    assert least_meeting(len(values), value, target, start) == expected
    assert len(probes) == len(set(probes))  # each replay is run once


def test_least_meeting_settles_on_a_local_boundary_of_a_bumpy_curve():
    values = [0.1, 0.3, 0.5, 0.45, 0.6, 0.7, 0.65, 0.8]  # FIFO-like anomalies: not monotone
    found = least_meeting(len(values), lambda i: values[i], 0.62, 7)
    assert values[found] >= 0.62 and values[found - 1] < 0.62


def test_least_meeting_takes_few_probes_on_a_smooth_hit_rate_curve():
    # a concave hit-rate curve over 1,659 single-slot budgets (26 layers x 64 experts, from 6 slots up)
    values = [1.0 - math.exp(-i / 500.0) for i in range(1659)]
    target = values[1000] - 1e-12
    value, probes = _counted(values)
    assert least_meeting(len(values), value, target, 1200) == 1000
    assert len(probes) <= 9  # plain bisection from the full range takes 12 (+1 to check the top)


@pytest.mark.parametrize("policy", ["imitation", "flat-predictor", "ppo"])  # learned eviction policies
def test_a_learned_policy_in_a_shared_pool_is_refused_in_one_line_everywhere(policy, capsys):
    """Learned scorers rank within a layer only (ranks_across_layers False): bench (before any replay, though
    its uniform cells come first), generate and the env refuse a shared pool with one line, exit 2."""
    from moe_env.cli import main
    from moe_env.env import MoEOffloadEnv
    from moe_env.errors import UsageError

    trace = "builtin:tiny-mixtral/eval#0"
    argv = ["bench", "--trace", trace, "--policies", f"lru,{policy}", "--cache-budget", "16",
            "--allocation", "uniform,shared", "--reference-budget", "none", "--json"]  # fmt: skip
    for command in (argv, ["generate", "--prompt", "def f(x):", "--max-new-tokens", "2", "--policy", policy,
                           "--cache-budget", "16", "--allocation", "shared"]):  # fmt: skip
        assert main(command) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert f"policy {policy!r} does not rank victims across layers" in err, err
    with pytest.raises(UsageError, match="does not rank victims across layers") as raised:
        MoEOffloadEnv(trace, budget="16", allocation="shared", fallback=policy)
    assert "\n" not in str(raised.value)
    assert main([*argv[:8], "uniform", *argv[9:]]) == 0  # the same policy under a per-layer layout runs
    assert json.loads(capsys.readouterr().out)["rows"]


def test_slot_and_budget_sweeps_print_one_row_schema(tmp_path, capsys):
    """`bench --cache-slots K` and `bench --cache-budget K*L --allocation uniform` replay the same cache: their rows
    have the same keys, in the same order, and the same values (except gap_captured, which only the slot sweep
    computes)."""
    from test_sim import BENCH_ROW_KEYS

    from moe_env.cli import main

    trace = "builtin:tiny-mixtral/eval#0,1"
    assert main(["bench", "--trace", trace, "--policies", "lru,lfu", "--cache-slots", "4", "--json"]) == 0
    slot_rows = json.loads(capsys.readouterr().out)
    argv = ["bench", "--trace", trace, "--policies", "lru,lfu", "--cache-budget", "16", "--allocation",
            "uniform,shared", "--reference-budget", "none", "--json"]  # fmt: skip
    assert main(argv) == 0
    budget_rows = json.loads(capsys.readouterr().out)["rows"]
    assert all(list(row) == list(BENCH_ROW_KEYS) for row in slot_rows + budget_rows)
    uniform = [row for row in budget_rows if row["allocation"] == "uniform"]
    for slot_row, budget_row in zip(slot_rows, uniform, strict=True):
        assert slot_row | {"gap_captured": None} == budget_row
        assert slot_row["slots"] == 4 and slot_row["total_slots"] == 16
    shared = [row for row in budget_rows if row["allocation"] == "shared"]
    assert shared and all(row["slots"] is None and row["total_slots"] == 16 for row in shared)
