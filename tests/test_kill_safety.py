"""kill -9 during `moe-env record` and `moe-env convert`: the previous file survives byte for byte, no partial file
appears under the final name, and the next run succeeds and removes the killed run's temp file.

The killed command runs the real CLI in a child process whose zip writer pauses after each member (tests/ only,
through a small runner), so the kill lands mid-write every time instead of racing a write of a few milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_env.cli import main
from moe_env.embedded import embedded_model_dir
from moe_env.trace import read_trace_file

SLOW_WRITER = """
import sys, time, zipfile
write = zipfile.ZipFile.writestr
def slow(self, *args, **kwargs):
    write(self, *args, **kwargs)
    self.fp.flush()
    time.sleep(0.05)
zipfile.ZipFile.writestr = slow
from moe_env.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_log(path: Path, problems: int, layers: int = 4, tokens: int = 6) -> Path:
    lines = [
        json.dumps({"problem_id": p, "layer": layer, "token_idx": t, "experts": [(p + t) % 8, (p + t + 1 + layer) % 8],
                    "gating_probs": [0.6, 0.4]})
        for p in range(problems) for t in range(tokens) for layer in range(layers)
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def temps(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".tmp"))


def kill_mid_write(argv: list[str], out: Path, env: dict[str, str], timeout_s: float = 600.0) -> Path:
    """Run `moe-env argv` in a child, SIGKILL it once its temp file next to `out` has data; the temp's path."""
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *argv], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            found = [p for p in temps(out.parent) if p.name.startswith(f".{out.name}.")]
            if found and found[0].stat().st_size > 0:
                child.send_signal(signal.SIGKILL)
                child.wait()
                return found[0]
            if child.poll() is not None:
                pytest.fail(f"the command ended (rc {child.returncode}) before it was killed: {child.stderr.read()}")
            time.sleep(0.005)
        pytest.fail("no temp file appeared")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def assert_killed_cleanly(out: Path, previous: bytes, temp: Path) -> None:
    assert temp.exists(), "the kill did not land during the write"
    assert out.read_bytes() == previous  # the previous file, intact
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)] == [out.name]  # nothing partial
    read_trace_file(out)  # and still a valid trace


@pytest.fixture
def child_env(tmp_path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_kill_during_convert(tmp_path, child_env):
    out = tmp_path / "out" / "trace.npz"
    assert main(["convert", str(write_log(tmp_path / "old.jsonl", 2)), "--out", str(out)]) == 0
    previous = out.read_bytes()
    new_log = write_log(tmp_path / "new.jsonl", 40)
    temp = kill_mid_write(["convert", str(new_log), "--out", str(out)], out, child_env)
    assert_killed_cleanly(out, previous, temp)

    assert main(["convert", str(new_log), "--out", str(out)]) == 0
    assert len(read_trace_file(out).sequences) == 40
    assert temps(out.parent) == []


def test_kill_during_record(tmp_path, child_env, monkeypatch):
    if not (embedded_model_dir("tiny-mixtral") / "config.json").exists():
        pytest.skip("embedded model tiny-mixtral not built in this checkout")
    monkeypatch.setenv("XDG_CACHE_HOME", child_env["XDG_CACHE_HOME"])
    out = tmp_path / "out" / "trace.npz"
    assert main(["convert", str(write_log(tmp_path / "old.jsonl", 2)), "--out", str(out)]) == 0
    previous = out.read_bytes()
    argv = ["record", "--prompts", "builtin:eval", "--limit", "3", "--max-new-tokens", "2", "--out", str(out)]
    temp = kill_mid_write(argv, out, child_env)
    assert_killed_cleanly(out, previous, temp)

    assert main(argv) == 0
    assert len(read_trace_file(out).sequences) == 3
    assert temps(out.parent) == []
