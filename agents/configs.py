"""Config files of the training scripts, checked before any work: every field typed and in range, one-line errors.

``load_config(cls, path, overrides, positive)`` reads a JSON object into the dataclass `cls`: unknown keys, a
wrongly typed field (``"total_timesteps": "many"``, ``"epochs": "x"``) and a value that must be positive but is not
(``epochs: 0``, ``--total-timesteps 0``) raise UsageError naming the file, the field and what it takes. Keys that
start with ``_`` are comments (``"_comment": "..."``). ``config_from_dict`` rebuilds a config stored in a checkpoint
or a run directory with the same unknown-key check.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from moe_env.errors import UsageError

T = TypeVar("T")


@dataclass
class PPOHyperparameters:
    """The stable-baselines3 PPO fields both PPO trainers take (the residual PPO's defaults; the eviction PPO
    sets its own)."""

    total_timesteps: int = 200_000
    n_envs: int = 4
    vec_env: str = "dummy"  # dummy: envs stepped in this process | subproc: one process per env (SubprocVecEnv)
    n_steps: int = 512
    batch_size: int = 256
    n_epochs: int = 5
    learning_rate: float = 3e-4
    gamma: float = 0.95
    gae_lambda: float = 0.9
    clip_range: float = 0.2
    ent_coef: float = 0.0
    profile: str | None = None  # cost model HARDWARE[:EXPERTS]; None = default hardware, trace's expert size
    eval_every: int = 20_000
    seed: int = 0
    torch_threads: int = 1

    def sb3_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``stable_baselines3.PPO`` these fields set."""
        return dict(learning_rate=self.learning_rate, n_steps=self.n_steps, batch_size=self.batch_size,
                    n_epochs=self.n_epochs, gamma=self.gamma, gae_lambda=self.gae_lambda,
                    clip_range=self.clip_range, ent_coef=self.ent_coef, seed=self.seed)  # fmt: skip


def load_config(
    cls: type[T],
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    positive: tuple[str, ...] = (),
    ignore: tuple[str, ...] = (),
) -> T:
    """`cls` from the JSON object in `path`, then `overrides` (command-line values; None = not given) applied.
    Keys in `ignore` (run metadata stored next to the config) and comment keys (``_...``) are dropped; fields in
    `positive` must be > 0."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config {path} is not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise UsageError(f"config {path} must hold a JSON object of {cls.__name__} fields")
    values = {k: v for k, v in values.items() if k not in ignore and not k.startswith("_")}
    _check_known(cls, values, f"config {path}")
    values |= {k: v for k, v in (overrides or {}).items() if v is not None}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        expected = hints[name]
        if not _matches(value, expected):
            origin = "the command line" if overrides and overrides.get(name) is not None else f"config {path}"
            raise UsageError(f"{origin}: {name} must be {_describe(expected)}, got {value!r}")
    for name in positive:
        value = values.get(name, getattr(cls, name, None))
        if value is not None and not value > 0:
            raise UsageError(f"{name} must be > 0, got {value!r} (nothing would be trained)")
    return cls(**values)


def config_from_dict(cls: type[T], values: dict[str, Any], where: str) -> T:
    """`cls` from `values` (a config saved by a run or in a checkpoint); unknown keys are refused in one line."""
    _check_known(cls, values, where)
    return cls(**values)


def _check_known(cls: type, values: dict[str, Any], where: str) -> None:
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(known)})")


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(expected) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict or expected is dict:
        return isinstance(value, dict)
    if expected is Any:
        return True
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(expected))
    if expected is type(None):
        return "null"
    if origin is list:
        plural = {int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(typing.get_args(expected)[0], 'values')}"
    if origin is dict:
        return "a JSON object"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(expected, getattr(expected, "__name__", str(expected)))
