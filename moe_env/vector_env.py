"""A vectorised replay env: many sequences of one trace advanced together (``gymnasium.make_vec`` of the env id).

Lanes autoreset as gymnasium's SyncVectorEnv does (NEXT_STEP: the step after an episode ends resets that lane,
reward 0) and seed as it does (lane i gets seed + i), so a ``ReplayVectorEnv`` gives the very arrays and infos a
SyncVectorEnv of the same single ``MoEOffloadEnv`` gives (tests/test_vector_env.py). Two ways to run the lanes
(``ReplayVectorEnv.path``): ``"arrays"`` (moe_env.lane_env.ReplayLanes: every lane's state in arrays, one compiled
call per step for all of them), for every option it supports (``lane_env.supported``: all but ``warm`` and a
fallback other than lru); ``"envs"``, one full single env per lane, for the rest.

``workers`` > 1 splits the lanes over that many processes: each steps its lanes in one batch per call, reading
actions from and writing observations, rewards and flags to shared memory, so one step of N lanes costs one
message per worker rather than one per lane. Only the batched infos travel through the pipes.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from moe_env.env import MoEOffloadEnv
from moe_env.errors import InvalidArgument, UsageError
from moe_env.lane_env import ReplayLanes, supported

_SCALARS = (int, float, bool)
PATHS = ("auto", "arrays", "envs")


class _Lanes:
    """Some lanes of the vector env as single envs, stepped in this process; writes into the caller's arrays and
    returns the lanes' infos batched."""

    def __init__(self, env_kwargs: dict[str, Any], count: int):
        self.envs = [MoEOffloadEnv(**env_kwargs) for _ in range(count)]
        for env in self.envs[1:]:
            env.share_sequence_cache(self.envs[0])
        self.needs_reset = [False] * count

    def reset(self, seeds: list[int | None], options: dict | None, obs: np.ndarray) -> dict[str, Any]:
        infos = []
        for i, (env, seed) in enumerate(zip(self.envs, seeds, strict=True)):
            obs[i], info = env.reset(seed=seed, options=options)
            infos.append(info)
        self.needs_reset = [False] * len(self.envs)
        return batched_infos(infos)

    def step(self, actions: np.ndarray, obs: np.ndarray, rewards: np.ndarray, terminated: np.ndarray,
             truncated: np.ndarray) -> dict[str, Any]:  # fmt: skip
        infos = []
        for i, env in enumerate(self.envs):
            if self.needs_reset[i]:
                obs[i], info = env.reset()
                rewards[i], terminated[i], truncated[i] = 0.0, False, False
            else:
                obs[i], rewards[i], terminated[i], truncated[i], info = env.step(actions[i])
            self.needs_reset[i] = bool(terminated[i] or truncated[i])
            infos.append(info)
        return batched_infos(infos)


def batched_infos(lane_infos: list[dict]) -> dict[str, Any]:
    """What VectorEnv._add_info builds lane by lane, built per key when every lane has the same scalar keys
    (the common case; the dtype is the first lane's value type, as _add_info picks it)."""
    count = len(lane_infos)
    keys = tuple(lane_infos[0])
    if all(tuple(info) == keys for info in lane_infos) and all(
        type(v) in _SCALARS or isinstance(v, np.number) for v in lane_infos[0].values()
    ):
        infos: dict[str, Any] = {}
        for key in keys:
            infos[key] = np.array([info[key] for info in lane_infos], dtype=type(lane_infos[0][key]))
            infos[f"_{key}"] = np.ones(count, dtype=np.bool_)
        return infos
    infos = {}
    batcher = _InfoBatcher(count)
    for i, info in enumerate(lane_infos):
        infos = batcher._add_info(infos, info, i)
    return infos


class _InfoBatcher(VectorEnv):
    """gymnasium's own _add_info (it reads num_envs only), for infos of mixed keys."""

    def __init__(self, num_envs: int):
        self.num_envs = num_envs


def merge_infos(parts: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """The batched infos of consecutive groups of lanes as one batch (a key some groups lack: zeros, mask False;
    the dtype is the first group's having it, as _add_info takes the first lane's)."""
    if len(parts) == 1:
        return parts[0]
    total = sum(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    merged: dict[str, Any] = {}
    for part, start, size in zip(parts, starts, sizes, strict=True):
        for key, value in part.items():
            if key not in merged:
                merged[key] = np.zeros((total, *value.shape[1:]), dtype=value.dtype)
            merged[key][start : start + size] = value
    return merged


def _group(env_kwargs: dict[str, Any], count: int, path: str) -> ReplayLanes | _Lanes:
    return ReplayLanes(env_kwargs, count) if path == "arrays" else _Lanes(env_kwargs, count)


def _shared(shape: tuple[int, ...], dtype: type) -> tuple[Any, tuple[int, ...], Any]:
    raw = mp.get_context("forkserver").RawArray("b", max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize))
    return raw, shape, dtype


def _view(buffer: tuple[Any, tuple[int, ...], Any]) -> np.ndarray:
    raw, shape, dtype = buffer
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _worker(conn: Connection, env_kwargs: dict[str, Any], lanes: slice, buffers: dict[str, Any], path: str) -> None:
    arrays = {name: _view(buffer)[lanes] for name, buffer in buffers.items()}
    try:
        group = _group(env_kwargs, lanes.stop - lanes.start, path)
        conn.send(("ok", None))
        while True:
            command, payload = conn.recv()
            if command == "step":
                infos = group.step(arrays["actions"], arrays["obs"], arrays["rewards"], arrays["terminated"],
                                   arrays["truncated"])  # fmt: skip
            elif command == "reset":
                infos = group.reset(payload[0], payload[1], arrays["obs"])
            else:
                break
            conn.send(("ok", infos))
    except Exception as exc:  # reported in the parent, which raises it
        conn.send(("error", exc))
    finally:
        conn.close()


class ReplayVectorEnv(VectorEnv):
    """``num_envs`` lanes of ``MoEOffloadEnv(**env_kwargs)``, in this process or over ``workers`` processes."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}  # noqa: RUF012 (gymnasium's convention)

    def __init__(self, num_envs: int = 8, workers: int = 1, path: str = "auto", **env_kwargs: Any):
        """``path``: "arrays", "envs" (one single env per lane: the reference, and what the bench compares), or
        "auto" (arrays where ``lane_env.supported``)."""
        if num_envs < 1 or not 1 <= workers <= num_envs:
            raise UsageError(f"need num_envs >= 1 and 1 <= workers <= num_envs, got {num_envs} and {workers}")
        if env_kwargs.pop("backend", "replay") != "replay":
            raise UsageError("only the replay backend is vectorised; for live envs use vectorization_mode='sync'")
        if path not in PATHS:
            raise UsageError(f"unknown vector env path {path!r}; choose one of {', '.join(PATHS)}")
        if path == "arrays" and not supported(env_kwargs):
            raise UsageError("warm lanes and fallbacks other than lru need path='envs' (or 'auto')")
        template = MoEOffloadEnv(**env_kwargs)
        env_kwargs["trace"] = template.trace  # loaded once, shipped to the workers as arrays
        self.num_envs = num_envs
        self.single_observation_space = template.observation_space
        self.single_action_space = template.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.autoreset_mode = AutoresetMode.NEXT_STEP
        obs_shape, action_shape = self.single_observation_space.shape, self.single_action_space.shape
        self._buffers = {
            "obs": _shared((num_envs, *obs_shape), np.float32),
            "actions": _shared((num_envs, *action_shape), np.float64),  # as given: a float32 copy could break ties
            "rewards": _shared((num_envs,), np.float64),
            "terminated": _shared((num_envs,), np.bool_),
            "truncated": _shared((num_envs,), np.bool_),
        }
        self._arrays = {name: _view(buffer) for name, buffer in self._buffers.items()}
        bounds = np.linspace(0, num_envs, workers + 1).round().astype(int)
        self._slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self.path = "arrays" if path == "arrays" or (path == "auto" and supported(env_kwargs)) else "envs"
        self._local: ReplayLanes | _Lanes | None = None
        self._pipes: list[Connection] = []
        self._processes: list[Any] = []
        if workers == 1:
            self._local = _group(env_kwargs, num_envs, self.path)
        else:
            context = mp.get_context("forkserver")
            for lanes in self._slices:
                parent, child = context.Pipe()
                args = (child, env_kwargs, lanes, self._buffers, self.path)
                process = context.Process(target=_worker, args=args, daemon=True)
                process.start()
                child.close()
                self._pipes.append(parent)
                self._processes.append(process)
            self._gather()
        self.closed = False

    def _gather(self) -> list[Any]:
        replies = [pipe.recv() for pipe in self._pipes]
        for status, payload in replies:
            if status == "error":
                self.close()
                raise payload
        return [payload for _, payload in replies]

    def _run(self, command: str, payload: Any = None) -> dict[str, Any]:
        if self._local is not None:
            a = self._arrays
            if command == "reset":
                return self._local.reset(payload[0], payload[1], a["obs"])
            return self._local.step(a["actions"], a["obs"], a["rewards"], a["terminated"], a["truncated"])
        for pipe, lanes in zip(self._pipes, self._slices, strict=True):
            pipe.send((command, None if payload is None else (payload[0][lanes], payload[1])))
        return merge_infos(self._gather(), [lanes.stop - lanes.start for lanes in self._slices])

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise UsageError(f"reset got {len(seeds)} seeds for {self.num_envs} lanes: give one per lane or an int")
        infos = self._run("reset", (seeds, options))
        return self._arrays["obs"].copy(), infos

    def step(self, actions):
        array = np.asarray(actions)
        if array.shape != self.action_space.shape:
            raise InvalidArgument(f"actions must have shape {self.action_space.shape}, got {array.shape}")
        if array.dtype.kind not in "fiu":  # before the copy, which would convert strings and bools silently
            raise InvalidArgument(f"actions must hold real numbers, got dtype {array.dtype}")
        self._arrays["actions"][:] = array  # NaN and inf are refused by the lanes (checked_action's rules)
        infos = self._run("step")
        a = self._arrays
        flags = a["terminated"].copy(), a["truncated"].copy()
        return a["obs"].copy(), a["rewards"].copy(), *flags, infos

    def close_extras(self, **kwargs: Any) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(BrokenPipeError, OSError):
                pipe.send(("close", None))
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
        self._pipes, self._processes = [], []
