"""Errors that the CLI reports as one line and exit code 2 (bad input, never a traceback)."""


class MoeEnvError(Exception):
    """Base of every user-facing error: the message says what was wrong and what to do."""


class UsageError(MoeEnvError):
    """A bad command-line value (unknown model, slots out of range, unknown link profile...)."""


class ModelError(MoeEnvError):
    """A model that cannot be offloaded (not MoE, unsupported family, missing files)."""


class TraceFormatError(MoeEnvError):
    """A trace file that is corrupt, truncated, of another version or of the wrong shape."""


class CheckpointError(MoeEnvError):
    """A policy checkpoint that is corrupt or does not match the model."""


class InvalidArgument(UsageError, ValueError):
    """A bad value given through the Python API (env arguments, actions): a ValueError, as Python callers and
    Gymnasium expect, and a UsageError, so the CLI still reports it as one line."""
