"""Output paths checked BEFORE the work starts, so a long run never fails at its last step.

``check_writable_dir(path, option)`` and ``check_writable_file(path, option)`` raise UsageError with one line
naming the option, the path and what is wrong. Writability is probed by creating (and removing) a temporary file
in the directory that would receive the output, because permission bits do not tell: root ignores them, while
``chattr +i`` or a read-only mount stop root too. Nothing is left behind; a missing directory is not created here
(the writer creates it when it writes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from moe_env.errors import UsageError


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (the directory a writer's mkdir -p would start from)."""
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _probe(directory: Path, option: str, target: Path) -> None:
    """Create and remove a temporary file in `directory`; UsageError if the filesystem refuses."""
    try:
        fd, name = tempfile.mkstemp(prefix=".moe-env-probe-", dir=directory)
    except OSError as exc:
        raise UsageError(
            f"{option} {target}: cannot write in {directory} ({exc.strerror or exc}); choose a writable location"
        ) from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def check_writable_dir(path: str | os.PathLike, option: str) -> Path:
    """`path` is, or can be created as, a directory that accepts new files. Returns it as a Path."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UsageError(f"{option} {target}: exists and is not a directory; give a directory path")
    _check_directory(target.absolute(), option, target)
    return target


def _check_directory(directory: Path, option: str, target: Path) -> None:
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise UsageError(f"{option} {target}: {existing} is a file, so no directory can be created under it")
    _probe(existing, option, target)


def check_writable_file(path: str | os.PathLike, option: str) -> Path:
    """`path` can be written (created, or replaced atomically) as a regular file. Returns it as a Path."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{option} {target}: is a directory; give a file path")
    if target.exists() and not target.is_file():
        raise UsageError(f"{option} {target}: exists and is not a regular file")
    if target.name in ("", ".", ".."):
        raise UsageError(f"{option} {target}: not a file name")
    _check_directory(target.absolute().parent, option, target)
    if target.exists():
        try:  # opening for update writes nothing, but fails on an immutable or read-only file
            with target.open("r+b"):
                pass
        except OSError as exc:
            raise UsageError(
                f"{option} {target}: the existing file cannot be replaced ({exc.strerror or exc})"
            ) from None
    return target
