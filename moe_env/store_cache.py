"""The engine's cached expert stores: ``$XDG_CACHE_HOME/moe-env`` (default ``~/.cache/moe-env``), kept bounded.

An entry ``<root>/<key>/`` holds ``experts.safetensors`` (the packed experts of one model directory and dtype),
``source.json`` (that model directory) and ``lock``. An engine holds a shared flock on ``lock`` while it reads the
store; the mtime of ``lock`` is the entry's last use. Opening an entry prunes the others, each only when its lock
can be taken exclusively without waiting (so an entry in use is never removed):

- entries whose model directory no longer exists (temporary models, deleted checkouts);
- entries unused for ``max_age_s`` (also the only rule for entries written before ``source.json`` existed);
- then the least recently used, until the entries total at most ``max_bytes`` (the entry being opened stays).

A removed entry is first renamed into ``.trash-*`` under the lock, so an engine that was waiting for the lock
sees that its entry is gone and makes a new one. Other folders in the root (bench scratch such as ``peers/``) are
not entries and are left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from moe_env.atomic import atomic_write
from moe_env.errors import UsageError

STORE_NAME = "experts.safetensors"
MAX_GB_VARIABLE = "MOE_ENV_CACHE_MAX_GB"
_KEY = re.compile(r"^[0-9a-f]{16}$")  # engine._store_key
_TRASH = ".trash-"


@dataclass(frozen=True)
class StoreCacheLimits:
    max_bytes: int = 20 * 2**30
    max_age_s: float = 30 * 86400.0

    @classmethod
    def from_environment(cls) -> StoreCacheLimits:
        """The defaults, with ``MOE_ENV_CACHE_MAX_GB`` (a positive number of GiB) overriding max_bytes."""
        text = os.environ.get(MAX_GB_VARIABLE)
        if text is None or not text.strip():
            return cls()
        try:
            gib = float(text)
        except ValueError:
            gib = float("nan")
        if not gib > 0 or gib == float("inf"):
            raise UsageError(f"{MAX_GB_VARIABLE} must be a positive number of GiB, got {text!r}")
        return cls(max_bytes=int(gib * 2**30))


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/moe-env``, or ``~/.cache/moe-env`` when the variable is unset or relative (XDG spec)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "moe-env"


class StoreEntry:
    """One cache entry held open: ``path`` is its directory, ``store_path`` the store file; close() releases it."""

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self.store_path = path / STORE_NAME
        self._lock_fd: int | None = lock_fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> StoreEntry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_entry(
    key: str, source_dir: Path, root: Path | None = None, limits: StoreCacheLimits | None = None
) -> StoreEntry:
    """The entry `key` for the model directory `source_dir`, locked shared and marked used; prunes the others."""
    root = cache_root() if root is None else Path(root)
    limits = StoreCacheLimits.from_environment() if limits is None else limits
    path = root / key
    while True:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.fstat(fd).st_ino == os.stat(path / "lock").st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # pruned while we waited for the lock: make the entry again
    try:
        os.utime(path / "lock")
        source = str(Path(source_dir).resolve())
        if _read_source(path) != source:
            with atomic_write(path / "source.json") as handle:
                handle.write(json.dumps({"source": source}).encode())
    except BaseException:
        os.close(fd)
        raise
    prune(root, limits, keep=path)
    return StoreEntry(path, fd)


def prune(root: Path, limits: StoreCacheLimits, keep: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove stale entries of `root` (see the module doc); returns the removed entries' paths."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    entries: list[tuple[float, int, Path]] = []  # (last use, bytes, path) of the entries kept so far
    try:
        children = sorted(root.iterdir())
    except OSError:
        return removed
    for child in children:
        if child.name.startswith(_TRASH):
            shutil.rmtree(child, ignore_errors=True)  # left by a pruner that was killed mid-removal
            continue
        if not _KEY.match(child.name) or not child.is_dir() or child == keep:
            continue
        last_use = _last_use(child)
        source = _read_source(child)
        gone = source is not None and not Path(source).is_dir()
        if gone or now - last_use > limits.max_age_s:
            if _remove_entry(root, child):
                removed.append(child)
        else:
            entries.append((last_use, _entry_bytes(child), child))
    total = sum(size for _, size, _ in entries) + (_entry_bytes(keep) if keep is not None else 0)
    for _, size, child in sorted(entries):  # least recently used first
        if total <= limits.max_bytes:
            break
        if _remove_entry(root, child):
            removed.append(child)
            total -= size
    return removed


def _read_source(entry: Path) -> str | None:
    try:
        return str(json.loads((entry / "source.json").read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _last_use(entry: Path) -> float:
    for name in ("lock", STORE_NAME):
        with contextlib.suppress(OSError):
            return (entry / name).stat().st_mtime
    with contextlib.suppress(OSError):
        return entry.stat().st_mtime
    return 0.0


def _entry_bytes(entry: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(entry):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _remove_entry(root: Path, entry: Path) -> bool:
    """Remove `entry` if no engine holds it; False when it is in use (or vanished)."""
    try:
        fd = os.open(entry / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # in use
        trash = root / f"{_TRASH}{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry, trash)
        except OSError:
            return False
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True
