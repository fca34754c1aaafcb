"""Atomic writes (moe_env.atomic): the old file or the new one, and no temp file that outlives a killed writer."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_env.atomic import atomic_write, remove_stale_temps


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def temp_of(target: Path, pid: int, tag: str = "abc123") -> Path:
    path = target.parent / f".{target.name}.moe-env-{pid}.{tag}.tmp"
    path.write_bytes(b"partial")
    return path


def test_write_replaces_and_keeps_the_mode(tmp_path):
    target = tmp_path / "t.npz"
    target.write_bytes(b"old")
    target.chmod(0o640)
    with atomic_write(target) as handle:
        handle.write(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the rename
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "t.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]


def test_the_next_write_removes_temps_of_dead_writers_only(tmp_path):
    target = tmp_path / "t.npz"
    stale = temp_of(target, dead_pid())
    stale_other_target = temp_of(tmp_path / "u.npz", dead_pid())
    live = temp_of(target, os.getpid(), "live01")  # a writer between creating and locking its file
    not_ours = tmp_path / ".t.npz.12345.tmp"  # another tool's naming
    not_ours.write_bytes(b"x")
    with atomic_write(target) as handle:
        handle.write(b"new")
    assert not stale.exists() and not stale_other_target.exists()
    assert live.exists() and not_ours.exists()


def test_a_locked_temp_is_kept_even_if_its_pid_looks_dead(tmp_path):
    """A writer on another host: its pid means nothing here, its lock does."""
    temp = temp_of(tmp_path / "t.npz", dead_pid())
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'rb'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(temp)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert remove_stale_temps(tmp_path) == []
        assert temp.exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_temps(tmp_path) == [temp]


def test_the_writer_holds_its_lock_while_writing(tmp_path):
    target = tmp_path / "t.npz"
    with atomic_write(target) as handle:
        (temp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        with open(temp, "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(b"x")
