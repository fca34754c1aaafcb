"""kill -9 of train/ppo.py and train/predictor.py: the previous output stays intact, no partial file takes its
name, and --resume works from a torn last checkpoint (falling back to the newest intact step-*.zip)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from test_env import synthetic_trace

from moe_env.trace import save_trace

ROOT = Path(__file__).resolve().parents[1]
PPO_CONFIG = {"total_timesteps": 100000, "n_envs": 1, "n_steps": 64, "batch_size": 64, "n_epochs": 1,
              "net_arch": [8], "eval_every": 64, "prior": "features"}  # fmt: skip


def _start(script: str, args: list[str], cwd: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train" / script), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _kill_when(process: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the script ended before it could be killed: {process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the script never reached the point to kill it at")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def _intact_zip(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return archive.testzip() is None


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    return save_trace(synthetic_trace(sequences=4, steps=12), tmp_path / "t.npz")


def test_ppo_killed_then_resumed_from_a_torn_last_checkpoint(tmp_path: Path, trace_file: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps(PPO_CONFIG))
    run = tmp_path / "run"
    args = ["--traces", f"{trace_file}#0-2", "--eval-traces", f"{trace_file}#3", "--config", str(tmp_path / "c.json"),
            "--run-dir", str(run)]  # fmt: skip
    checkpoints = run / "checkpoints"
    process = _start("ppo.py", args, tmp_path)
    _kill_when(process, lambda: len(list(checkpoints.glob("step-*.zip"))) >= 2)
    # what the kill left: every file under its final name is whole (the writes go through temp files)
    assert _intact_zip(checkpoints / "last.zip")
    assert all(_intact_zip(p) for p in checkpoints.glob("step-*.zip"))
    steps = sorted(checkpoints.glob("step-*.zip"))
    # tear last.zip as a kill in the middle of a non-atomic copy would have
    data = (checkpoints / "last.zip").read_bytes()
    (checkpoints / "last.zip").write_bytes(data[: len(data) // 2])
    target = int(steps[-1].stem.split("-")[1]) + 128  # a little more training than the checkpoints hold
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "train" / "ppo.py"), *args, "--resume", "--total-timesteps", str(target)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    warnings = [line for line in resumed.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "last.zip is torn; resuming from step-" in warnings[0]
    assert steps[-1].name in warnings[0]  # the newest intact step checkpoint
    assert _intact_zip(checkpoints / "last.zip")
    assert not list(checkpoints.glob(".*.tmp"))


def test_predictor_killed_leaves_the_previous_output_intact(tmp_path: Path, trace_file: Path) -> None:
    out = tmp_path / "p.pt"
    previous = b"previous predictor, kept byte for byte"
    out.write_bytes(previous)
    out.with_suffix(".json").write_text("{}")
    args = ["--traces", f"{trace_file}#0-2", "--eval-traces", f"{trace_file}#3", "--epochs", "100000",
            "--out", str(out), "--run-dir", str(tmp_path / "run")]  # fmt: skip
    process = _start("predictor.py", args, tmp_path)
    seen: list[str] = []

    def training() -> bool:  # the script prints this line once it has begun training
        line = process.stdout.readline()
        seen.append(line)
        return "training decisions" in line

    _kill_when(process, training)
    time.sleep(1.0)  # well into the epochs
    assert out.read_bytes() == previous
    assert out.with_suffix(".json").read_text() == "{}"
    # no partial file next to the output (the run directory holds the epochs, for --resume)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.pt", "run", "t.npz"]
