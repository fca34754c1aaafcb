"""Sequence selection in a trace spec: ``SPEC#SELECTION`` keeps some sequences of the trace SPEC, in the given order.

    SPEC#0,2          sequences 0 and 2 (0-based positions in the trace)
    SPEC#0-99,120     positions 0..99 (inclusive) and 120
    SPEC#id=1-800     sequences whose prompt_id is a number in 1..800 (gaps, such as a missing prompt, are fine)
    SPEC#id=a,b       sequences whose prompt_id is "a" or "b"

Splits are always by sequence, never by token: a selection picks whole sequences.
"""

from __future__ import annotations

import re

from moe_env.errors import UsageError
from moe_env.trace import Trace

_RANGE = re.compile(r"^(\d+)-(\d+)$")
ID_PREFIX = "id="


def split_spec(spec: str) -> tuple[str, str]:
    """'T.npz#0,2' -> ('T.npz', '0,2'); no '#': (spec, '')."""
    base, _, selection = spec.partition("#")
    return base, selection


def select_sequences(trace: Trace, selection: str, label: str = "trace") -> Trace:
    """The sequences of `trace` named by `selection` (module docstring); a bad or empty selection is a UsageError."""
    if not selection:
        return trace
    if selection.startswith(ID_PREFIX):
        keep = _by_prompt_id(trace, selection[len(ID_PREFIX) :], label)
    else:
        keep = _by_position(trace, selection, label)
    if len(set(keep)) != len(keep):
        raise UsageError(f"sequence selection #{selection} of {label} names a sequence twice")
    return Trace(trace.meta, [trace.sequences[i] for i in keep])


def _pieces(text: str, selection: str) -> list[str]:
    pieces = [p.strip() for p in text.split(",")]
    if not pieces or any(not p for p in pieces):
        raise UsageError(f"bad sequence selection #{selection}: empty item (use e.g. #0,2,5-9 or #id=1-800)")
    return pieces


def _by_position(trace: Trace, selection: str, label: str) -> list[int]:
    n = len(trace.sequences)
    keep: list[int] = []
    for piece in _pieces(selection, selection):
        match = _RANGE.match(piece)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
        elif piece.isdigit():
            first = last = int(piece)
        else:
            raise UsageError(
                f"bad sequence selection #{selection}: {piece!r} is not a position or a range "
                f"(use e.g. #0,2,5-9, or #id=1-800 for prompt ids)"
            )
        if first > last:
            raise UsageError(f"bad sequence selection #{selection}: range {piece} runs backwards")
        if last >= n:
            raise UsageError(f"sequence selection #{selection}: position {last} is past the {n} sequences of {label}")
        keep.extend(range(first, last + 1))
    return keep


def _by_prompt_id(trace: Trace, text: str, label: str) -> list[int]:
    selection = ID_PREFIX + text
    position = {seq.prompt_id: i for i, seq in enumerate(trace.sequences)}
    numeric = {int(pid): i for pid, i in position.items() if pid.isdigit()}
    keep: list[int] = []
    for piece in _pieces(text, selection):
        match = _RANGE.match(piece)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if first > last:
                raise UsageError(f"bad sequence selection #{selection}: range {piece} runs backwards")
            keep.extend(numeric[n] for n in sorted(numeric) if first <= n <= last)
        elif piece in position:
            keep.append(position[piece])
        else:
            raise UsageError(f"sequence selection #{selection}: {label} has no sequence with prompt id {piece!r}")
    if not keep:
        raise UsageError(f"sequence selection #{selection} selects no sequence of {label}")
    return keep
