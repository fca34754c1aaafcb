"""Bad inputs of train/ppo.py, train/predictor.py and train/imitation.py: refused BEFORE any training with exit
code 2, one line naming the problem, no traceback, nothing written (no run directory, no checkpoint, no shipped
file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_modules import load_script
from test_env import synthetic_trace

from moe_env.trace import save_trace

ROOT = Path(__file__).resolve().parents[1]
READ_ONLY = "/proc/moe-env-test-output"  # not writable even by root (permission bits are not)


def _script(name: str):
    return load_script(f"train/{name}.py")


@pytest.fixture(scope="module")
def scripts():
    return {name: _script(name) for name in ("ppo", "predictor", "imitation")}


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """Trace files and configs under tmp_path/in; the cwd is tmp_path/work (the default runs/ would go there)."""
    directory = tmp_path / "in"
    directory.mkdir()
    trace = save_trace(synthetic_trace(sequences=4), directory / "t.npz")
    other = save_trace(synthetic_trace(sequences=2, experts=8), directory / "other-shape.npz")
    configs = {
        "many": {"total_timesteps": "many"},
        "arch": {"net_arch": "wide"},
        "unknown": {"no_such_field": 1},
        "epochs_x": {"epochs": "x"},
        "hidden_float": {"hidden": 1.5},
        "lr_negative": {"lr": -1.0},
        "gamma_bool": {"gamma": True},
        "rounds_zero": {"_comment": "comments are allowed", "rounds": 0},
        "capacities_text": {"capacities": "8,16"},
    }
    paths = {"trace": str(trace), "other": str(other), "dir": str(directory), "file": str(trace),
             "residual": str(ROOT / "train" / "configs" / "ppo-residual.json")}  # fmt: skip
    for name, values in configs.items():
        (directory / f"{name}.json").write_text(json.dumps(values))
        paths[name] = str(directory / f"{name}.json")
    (directory / "not-json.json").write_text("{total_timesteps: 5")
    paths["not_json"] = str(directory / "not-json.json")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return paths


PPO_CASES = [
    ("config-string-timesteps", ["--config", "{many}"], "total_timesteps must be an integer, got 'many'"),
    ("config-string-arch", ["--config", "{arch}"], "net_arch must be a list of integers, got 'wide'"),
    ("config-bool-float", ["--config", "{gamma_bool}"], "gamma must be a number, got True"),
    ("config-unknown-key", ["--config", "{unknown}"], "unknown field(s) no_such_field"),
    ("config-not-json", ["--config", "{not_json}"], "is not valid JSON"),
    ("config-missing", ["--config", "{dir}/none.json"], "cannot read config"),
    ("timesteps-zero", ["--total-timesteps", "0"], "total_timesteps must be > 0, got 0"),
    ("timesteps-negative", ["--total-timesteps", "-5"], "total_timesteps must be > 0, got -5"),
    ("capacity-zero", ["--capacity", "0"], "cache slots 0 outside 2..6"),
    ("capacity-too-big", ["--capacity", "99"], "cache slots 99 outside 2..6"),
    ("ship-read-only", ["--ship", READ_ONLY + "/p.pt"], "--ship /proc/moe-env-test-output/p.pt"),
    ("ship-a-directory", ["--ship", "{dir}"], "is a directory; give a file path"),
    ("ship-under-a-file", ["--ship", "{file}/p.pt"], "is a file, so no directory can be created under it"),
    ("run-dir-a-file", ["--run-dir", "{file}"], "exists and is not a directory"),
    ("run-dir-read-only", ["--run-dir", READ_ONLY], "--run-dir /proc/moe-env-test-output: cannot write"),
    ("resume-no-run-dir", ["--resume"], "--resume needs --run-dir"),
    ("resume-nothing-there", ["--resume", "--run-dir", "{dir}/empty-run"], "no intact checkpoint"),
    ("one-train-sequence", ["--traces", "{trace}#0", "--eval-traces", "{trace}#1"], "validation split needs"),
    ("too-few-to-hold-out", ["--traces", "{trace}#0,1"], "too few to hold out evaluation"),
    ("eval-is-training", ["--traces", "{trace}", "--eval-traces", "{trace}#0"], "every evaluation sequence is a"),
    (
        "validation-is-training",
        ["--traces", "{trace}#0-2", "--eval-traces", "{trace}#3", "--validation-traces", "{trace}#1"],
        "every validation sequence is a",
    ),
    ("eval-other-shape", ["--traces", "{trace}", "--eval-traces", "{other}"], "but this model has (3, 8, 2)"),
    ("traces-missing", ["--traces", "{dir}/none.npz"], "no such trace"),
    ("bad-selection", ["--traces", "{trace}#x"], "'x' is not a position or a range"),
    ("selection-past-end", ["--traces", "{trace}#9"], "position 9 is past the 4 sequences"),
    (
        "prior-predictor-missing",
        ["--config", "{residual}", "--prior", "predictor", "--prior-predictor", "{dir}/none.pt"],
        "no such file",
    ),
    ("prior-with-eviction-ppo", ["--prior", "features"], "--prior applies to the residual PPO"),
    ("start-missing", ["--start", "{dir}/none.pt"], "--start {dir}/none.pt: no such file"),
    ("start-not-a-checkpoint", ["--start", "{not_json}"], "not a readable policy checkpoint"),
    ("start-with-residual-ppo", ["--config", "{residual}", "--start", "{file}"], "--start applies to the eviction"),
    ("reward-unknown", ["--reward", "hits"], "unknown reward 'hits'"),
    ("capacity-no-eviction", ["--capacity", "6"], "at 6 nothing is ever evicted"),
]
PREDICTOR_CASES = [
    ("config-string-epochs", ["--config", "{epochs_x}"], "epochs must be an integer, got 'x'"),
    ("config-float-hidden", ["--config", "{hidden_float}"], "hidden must be an integer, got 1.5"),
    ("config-negative-lr", ["--config", "{lr_negative}"], "lr must be > 0, got -1.0"),
    ("config-not-json", ["--config", "{not_json}"], "is not valid JSON"),
    ("epochs-zero", ["--epochs", "0"], "epochs must be > 0, got 0"),
    ("capacity-zero", ["--capacity", "0"], "cache slots 0 outside 2..6"),
    ("out-a-directory", ["--out", "{dir}"], "is a directory; give a file path"),
    ("out-read-only", ["--out", READ_ONLY + "/p.pt"], "--out /proc/moe-env-test-output/p.pt"),
    ("out-under-a-file", ["--out", "{file}/p.pt"], "is a file, so no directory can be created under it"),
    ("eval-other-shape", ["--traces", "{trace}", "--eval-traces", "{other}"], "but this model has (3, 8, 2)"),
    ("one-train-sequence", ["--traces", "{trace}#0", "--eval-traces", "{trace}#1"], "validation split needs"),
    ("eval-is-training", ["--traces", "{trace}", "--eval-traces", "{trace}"], "every evaluation sequence is a"),
    ("bad-selection", ["--traces", "{trace}#1-0"], "range 1-0 runs backwards"),
]
IMITATION_CASES = [
    ("config-string-epochs", ["--config", "{epochs_x}"], "epochs must be an integer, got 'x'"),
    ("config-unknown-key", ["--config", "{unknown}"], "unknown field(s) no_such_field"),
    ("config-rounds-zero", ["--config", "{rounds_zero}"], "rounds must be > 0, got 0"),
    ("config-capacities-text", ["--config", "{capacities_text}"], "capacities must be a list of integers or null"),
    ("config-not-json", ["--config", "{not_json}"], "is not valid JSON"),
    ("epochs-zero", ["--epochs", "0"], "epochs must be > 0, got 0"),
]


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [pytest.param("ppo", a, m, id=f"ppo-{i}") for i, a, m in PPO_CASES]
    + [pytest.param("predictor", a, m, id=f"predictor-{i}") for i, a, m in PREDICTOR_CASES]
    + [pytest.param("imitation", a, m, id=f"imitation-{i}") for i, a, m in IMITATION_CASES],
)
def test_bad_input_is_refused_before_training(scripts, inputs, tmp_path, capsys, script, args, message):
    argv = [a.format(**inputs) for a in args]
    message = message.format(**inputs)
    if "--traces" not in argv:
        argv += ["--traces", inputs["trace"]]  # small: a refusal must not depend on the default traces
    before = _listing(tmp_path)
    assert scripts[script].main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"train/{script}.py: error: "), captured.err
    assert message in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""
    assert _listing(tmp_path) == before  # no run directory, checkpoint or shipped file
