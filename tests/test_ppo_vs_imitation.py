"""bench/ppo_vs_imitation.py: a PPO checkpoint with its start's (or another run's) weights is replayed once and its
result reused, and the reused rows equal what a replay of that checkpoint gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from moe_env.agents.checkpoint import load_checkpoint
from moe_env.agents.imitation import load_scorer_net, shipped_imitation_path
from moe_env.agents.ppo import PPOPolicy, save_eviction_ppo
from moe_env.agents.traces import load_traces
from script_modules import load_script
from test_env import synthetic_trace

from moe_env.sim import simulate
from moe_env.trace import save_trace

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_script("bench/ppo_vs_imitation.py")


def test_equal_weights_are_replayed_once_and_the_rows_match_a_direct_replay(tmp_path, capsys):
    trace = synthetic_trace(sequences=2, steps=12, layers=3, experts=8, top_k=2)
    trace_file = save_trace(trace, tmp_path / "t.npz")
    net = load_scorer_net(load_checkpoint(shipped_imitation_path(), "imitation"), "imitation")
    step0 = save_eviction_ppo(net, {"needs": []}, tmp_path / "step0.pt")
    with torch.no_grad():
        net.body[0].weight.mul_(torch.linspace(-1.0, 1.0, net.body[0].weight.numel()).reshape_as(net.body[0].weight))
    changed = save_eviction_ppo(net, {"needs": []}, tmp_path / "changed.pt")
    again = save_eviction_ppo(net, {"needs": []}, tmp_path / "again.pt")
    bench = _bench()
    assert bench.distinct_policies(shipped_imitation_path(), [step0, changed, again]) == [bench.START, 1, 1]
    out = tmp_path / "rows.json"
    args = ["--runs", str(step0), str(changed), str(again), "--validation", f"{trace_file}#0", "--held-out",
            f"{trace_file}#1", "--capacities", "3,5", "--json", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    assert "replayed once" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [(r["set"], r["capacity"]) for r in rows] == [("validation", 3), ("held-out", 3), ("validation", 5),
                                                         ("held-out", 5)]  # fmt: skip
    for row in rows:
        assert all(v == 0.0 for v in (row["change"][m][0] for m in bench.METRICS))  # step 0 is the start
        assert row["ppo"][1] == row["ppo"][2]
        one = load_traces(f"{trace_file}#{0 if row['set'] == 'validation' else 1}")
        direct = simulate(one, PPOPolicy(changed), row["capacity"])
        assert row["ppo"][1]["hit_rate"] == direct.hit_rate
    # the same rows from two replay processes (the script run as it is run: a pool pickles its tasks by module)
    out2 = tmp_path / "rows2.json"
    script = [sys.executable, str(ROOT / "bench" / "ppo_vs_imitation.py"), *args[:-1], str(out2), "--jobs", "2"]
    subprocess.run(script, check=True, capture_output=True)
    assert json.loads(out2.read_text()) == rows


def test_bad_jobs_is_refused_with_one_line(tmp_path, capsys):
    assert _bench().main(["--runs", "x.pt", "--validation", "a", "--held-out", "b", "--jobs", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
