"""Atomic file writes whose temp files do not outlive a killed writer.

``atomic_write(path)`` yields a binary file ``.NAME.moe-env-<pid>.<random>.tmp`` next to ``path``; on a clean exit it
is flushed, fsynced and renamed over ``path`` (readers see the old file or the new one, never a mix), on an
exception it is removed. A writer killed by SIGKILL cannot remove its temp file, so every write first removes the
stale temp files of this naming in the same directory: those whose writer process is gone AND whose flock (held
by the writer for the whole write) is free. Both checks, so a live concurrent writer is never disturbed: the pid
covers the moment between creating the file and locking it, the lock covers pid reuse and writers on other hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


# .NAME.moe-env-PID.RANDOM.tmp (RANDOM as tempfile.mkstemp makes it)
_TEMP = re.compile(r"^\..+\.moe-env-(?P<pid>\d+)\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")


def temp_prefix(path: Path) -> str:
    """The prefix of this process's temp files for `path` (a random part and TEMP_SUFFIX follow)."""
    return f".{path.name}.moe-env-{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove the temp files that killed writers left in `directory`; returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMP.match(name)
        if match is None or _process_alive(int(match["pid"])):
            continue
        candidate = directory / name
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer holds it
            os.unlink(candidate)
            removed.append(candidate)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_write(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """Write `path` through a locked temp file renamed over it (see the module doc).

    `mode`: the permission bits of the new file; default: those of the file it replaces, else 0o644 (mkstemp
    alone would make it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the process ends, however it ends
            if mode is None:
                mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
            os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp_name, path)  # still locked: no cleaner sees this file unlocked under its temp name
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not every filesystem allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
