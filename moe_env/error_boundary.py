"""The error boundary of every command and script: bad input and failing plug-ins end in ONE line and exit 2.

``run_reporting_errors(prog, body)`` runs ``body()`` and turns
- a MoeEnvError (bad input, corrupt file, a policy returning garbage) into ``PROG: error: MESSAGE``, exit 2;
- any exception a policy plug-in raises while it runs (``reset``, ``observe``, ``eviction_scores``, ``prefetch``,
  ...), including ``SystemExit`` and ``KeyboardInterrupt`` raised by the plug-in itself, into a line naming the
  plug-in, the method and what it raised, exit 2;
- Ctrl-C by the user into ``PROG: interrupted``, exit 130.

The plug-in is found in the traceback (the innermost frame running a method of a Policy), after the fact: the
cache's decision point (moe_env.cache.ExpertCacheState.route) needs no try/except per call and no proxy around
the policy, so a run costs the same as without this boundary. A user's Ctrl-C and a KeyboardInterrupt raised by
a plug-in are told apart by a SIGINT handler installed for the duration of ``body`` (main thread only).
Any other exception is a bug in moe-env and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from moe_env.errors import MoeEnvError
from moe_env.policy import Policy


def plugin_in_traceback(tb: TracebackType | None) -> tuple[str, str] | None:
    """(policy name, method name) of the innermost traceback frame that runs a method of a Policy, else None."""
    found = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, Policy):
            found = (str(getattr(owner, "name", type(owner).__name__)), tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return found


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@contextmanager
def _sigint_watch() -> Iterator[list[bool]]:
    """Records whether SIGINT arrived (the user's Ctrl-C) while keeping Python's KeyboardInterrupt behaviour."""
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield [True]  # someone else owns SIGINT: every KeyboardInterrupt counts as the user's
        return

    def on_sigint(signum: int, frame: object) -> None:
        pressed.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_reporting_errors(prog: str, body: Callable[[], int | None]) -> int:
    """Run `body` and return its exit code; report bad input and plug-in failures as one line (see module doc)."""
    with _sigint_watch() as pressed:
        try:
            return int(body() or 0)
        except MoeEnvError as exc:
            print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            plugin = None if pressed else plugin_in_traceback(exc.__traceback__)
            if plugin is None:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            _report_plugin(prog, plugin, exc)
            return 2
        except (Exception, SystemExit) as exc:
            plugin = plugin_in_traceback(exc.__traceback__)
            if plugin is None:
                raise
            _report_plugin(prog, plugin, exc)
            return 2


def _report_plugin(prog: str, plugin: tuple[str, str], exc: BaseException) -> None:
    name, method = plugin
    what = f"exited (SystemExit {exc.code!r})" if isinstance(exc, SystemExit) else f"raised {_first_line(exc)}"
    print(
        f"{prog}: error: policy plug-in {name!r} {what} in {method}(); fix the plug-in or choose another policy",
        file=sys.stderr,
    )
