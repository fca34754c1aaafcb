"""Trace specs for the training scripts: anything ``moe_env.trace.load_trace`` reads, plus a sequence selection.

``SPEC#0,2`` keeps only sequences 0 and 2 (to train on one sequence of a recorded or converted trace and evaluate
on another).
"""

from __future__ import annotations

from moe_env.errors import UsageError
from moe_env.trace import Trace, load_trace


def load_traces(spec: str) -> Trace:
    base, _, keep = spec.partition("#")
    trace = load_trace(base)
    if keep:
        try:
            indices = [int(i) for i in keep.split(",")]
            trace = Trace(trace.meta, [trace.sequences[i] for i in indices])
        except (ValueError, IndexError):
            raise UsageError(f"bad sequence selection #{keep} for {len(trace.sequences)} sequences") from None
    return trace


def split_validation(trace: Trace, fraction: float = 0.2) -> tuple[Trace, Trace]:
    """(train, validation): the last `fraction` of the sequences (at least one) when there are 5 or more, else the
    whole trace for both. Model selection and calibration use validation, so eval traces stay unseen."""
    n = len(trace.sequences)
    if n < 5:
        return trace, trace
    cut = n - max(1, round(n * fraction))
    return Trace(trace.meta, trace.sequences[:cut]), Trace(trace.meta, trace.sequences[cut:])
