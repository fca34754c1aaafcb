"""The torch CPU thread count of the commands that run a model (``--threads``), and its default.

DEFAULT_THREADS is chosen by measurement (``bench/threads.py``; table in docs/performance.md, "Threads"): torch's
own default (one thread per physical core, 2 here) decoded tiny-mixtral 16-32x slower than one thread on the
shared 2-core machine, and issue 9 measured one thread faster on a quiet machine too (212 against 164 tok/s).
"""

from __future__ import annotations

import argparse

DEFAULT_THREADS = 1


def thread_count(text: str) -> int:
    """argparse type of ``--threads``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=DEFAULT_THREADS,
        help=f"torch CPU threads (default {DEFAULT_THREADS}: see docs/performance.md, Threads)",
    )


def set_threads(threads: int) -> None:
    """Run torch's CPU operators on `threads` threads (process-wide)."""
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
