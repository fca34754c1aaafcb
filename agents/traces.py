"""Trace specs and splits for the training scripts: splits by sequence, never by token, never overlapping.

A spec is anything ``moe_env.trace.load_trace`` reads, with an optional sequence selection (``SPEC#0,2,5-9``,
``SPEC#id=1-800``: moe_env.trace_select). ``make_splits`` turns the scripts' ``--traces`` / ``--validation-traces``
/ ``--eval-traces`` into three disjoint sets of sequences; a run whose validation (or evaluation) would contain
its training data is refused with one line saying what to pass instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from moe_env.errors import UsageError
from moe_env.trace import SequenceTrace, Trace, load_trace
from moe_env.trace_select import select_sequences, split_spec

DEFAULT_TRAIN = "builtin:tiny-mixtral/train"
DEFAULT_EVAL = "builtin:tiny-mixtral/eval"


def load_traces(spec: str) -> Trace:
    """The trace of a spec with its selection (kept for the scripts; load_trace reads selections itself)."""
    return load_trace(spec)


@dataclass
class Splits:
    train: Trace
    validation: Trace
    evaluation: Trace
    eval_label: str  # what the evaluation set is, for tables and logs
    note: str  # one line: how the sets were made
    warnings: list[str]  # partial overlaps (repeated prompts), to print

    def checked_capacity(self, capacity: int | None) -> int:
        """The slots per layer to train at (half the experts when None), valid for every set, whose model must be
        the training set's: refused before any training starts."""
        from moe_env.agents.checkpoint import check_model, spec_dict

        from moe_env.env import default_capacity
        from moe_env.sim import check_capacity, model_spec

        meta = self.train.meta
        capacity = default_capacity(meta.num_experts, meta.top_k) if capacity is None else capacity
        for trace in (self.train, self.validation, self.evaluation):
            check_capacity(trace.meta, capacity)
        trained_for = spec_dict(model_spec(meta))
        check_model(trained_for, model_spec(self.validation.meta), "--validation-traces")
        check_model(trained_for, model_spec(self.evaluation.meta), "--eval-traces")
        return capacity


def split_validation(trace: Trace, fraction: float = 0.2, label: str = "the training traces") -> tuple[Trace, Trace]:
    """(train, validation): the last `fraction` of the sequences (at least one) for validation. Fewer than two
    sequences cannot be split: refused, since validating on the training data measures nothing."""
    n = len(trace.sequences)
    if n < 2:
        raise UsageError(
            f"{label} hold {n} sequence(s): a validation split needs at least 2; give more sequences or "
            "--validation-traces SPEC with other sequences (e.g. LOG#0 for training and LOG#1 for validation)"
        )
    cut = n - max(1, round(n * fraction))
    return Trace(trace.meta, trace.sequences[:cut]), Trace(trace.meta, trace.sequences[cut:])


def make_splits(
    traces: str | None, eval_traces: str | None, validation_traces: str | None = None, eval_fraction: float = 0.1
) -> Splits:
    """Training, validation and evaluation sets from the scripts' options.

    No ``--traces``: the shipped tiny-mixtral train/eval splits. ``--traces`` without ``--eval-traces``: its last
    `eval_fraction` of sequences (at least one) are held out for evaluation. Validation: ``--validation-traces``,
    else the last 20% of the remaining training sequences."""
    train_spec = traces or DEFAULT_TRAIN
    if eval_traces is None and traces is None:
        eval_traces = DEFAULT_EVAL
    load_traces = _memoised_loader()  # D#id=1-800 and D#id=901-1000 parse the log D once
    train = load_traces(train_spec)
    if eval_traces is None:
        n = len(train.sequences)
        if n < 3:
            raise UsageError(
                f"{train_spec} holds {n} sequence(s): too few to hold out evaluation and validation sequences; "
                "give --eval-traces SPEC (and --validation-traces SPEC), e.g. LOG#0 / LOG#1"
            )
        cut = n - max(1, round(n * eval_fraction))
        evaluation = Trace(train.meta, train.sequences[cut:])
        train = Trace(train.meta, train.sequences[:cut])
        eval_label = f"{train_spec} (last {n - cut} of {n} sequences, held out)"
    else:
        evaluation = load_traces(eval_traces)
        eval_label = eval_traces
    if validation_traces is None:
        train, validation = split_validation(train, label=train_spec)
        how = f"last {len(validation.sequences)} of {len(train.sequences) + len(validation.sequences)} for validation"
    else:
        validation = load_traces(validation_traces)
        how = f"validation on {validation_traces}"
    for name, other in (("validation", validation), ("evaluation", evaluation)):
        if not other.sequences:
            raise UsageError(f"the {name} set is empty; select at least one sequence")
    seen = Trace(train.meta, train.sequences + validation.sequences)  # evaluation must be new to both
    warnings = [w for w in (overlap_warning(train, validation, "validation"),
                            overlap_warning(seen, evaluation, "evaluation")) if w]  # fmt: skip
    note = f"{len(train.sequences)} training sequences ({how}), {len(evaluation.sequences)} for evaluation"
    return Splits(train, validation, evaluation, eval_label, note, warnings)


def overlap_warning(train: Trace, other: Trace, what: str) -> str:
    """Refuse (UsageError) a `what` set whose every sequence is a sequence of `train` (same routing, whatever file it
    was read from): it would measure the training data. A partial overlap (real prompt sets repeat prompts:
    dsv2lite-puffin holds 23 routings twice or more) is returned as a warning line ("" if none)."""
    seen = {_fingerprint(s) for s in train.sequences}
    shared = [s for s in other.sequences if _fingerprint(s) in seen]
    if shared and len(shared) == len(other.sequences):
        raise UsageError(
            f"every {what} sequence is a training sequence: the {what} would measure the training data; select "
            "disjoint sequences, e.g. --traces LOG#0-9 and LOG#10-12"
        )
    if not shared:
        return ""
    ids = ", ".join(repr(s.prompt_id) for s in shared[:4]) + (" ..." if len(shared) > 4 else "")
    return f"warning: {len(shared)} of {len(other.sequences)} {what} sequences repeat a training sequence ({ids})"


def _memoised_loader():
    """load_traces that reads each base spec (before its #selection) once per call of make_splits."""
    loaded: dict[str, Trace] = {}

    def load(spec: str) -> Trace:
        base, selection = (spec, "") if Path(spec).exists() else split_spec(spec)
        if base not in loaded:
            loaded[base] = load_trace(base)
        return select_sequences(loaded[base], selection, base)

    return load


def _fingerprint(seq: SequenceTrace) -> str:
    return hashlib.blake2b(seq.experts.tobytes() + str(seq.experts.shape).encode(), digest_size=16).hexdigest()
