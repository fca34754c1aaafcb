"""Progress of a log import: a tqdm bar in bytes on stderr, shown on a terminal or for large inputs only."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

LARGE_INPUT_BYTES = 64 * 2**20  # below this an import takes about a second: no bar in logs


def show_progress(total_bytes: int) -> bool:
    return sys.stderr.isatty() or total_bytes >= LARGE_INPUT_BYTES


@contextlib.contextmanager
def byte_progress(files: Sequence[Path], label: str) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(nbytes)``: call it as input is parsed (``file_size(file)`` after a whole file)."""
    total = sum(file_size(file) for file in files)
    with tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr, leave=False,
              disable=not show_progress(total)) as bar:  # fmt: skip
        yield lambda nbytes: bar.update(min(nbytes, total - bar.n))


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
