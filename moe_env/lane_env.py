"""Many replay-env lanes as arrays: one step of N lanes is one compiled call plus a handful of numpy operations.

``ReplayLanes`` gives, lane for lane, exactly what N ``MoEOffloadEnv`` give (observations, rewards, flags, infos,
seeding and sequence choice; tests/test_vector_env.py compares them with a SyncVectorEnv of single envs). Every
lane's state has a leading lane axis: the cache's arrays (those ExpertCacheState hands moe_env.cache_kernel), the
action's scores per layer, the cost model's time line, the observation features (``LaneFeatures``) and the
episode's counters. A step routes all lanes' current decode events through the cache kernel in one call
(moe_env.lane_kernel), then builds the observations with vectorised numpy.

What is prepared once per sequence, by a private single env over the same trace and options (``template``): its
prefill replay (cold, with the fallback, before any decision, so a pure function of the sequence) as a snapshot
of the state it leaves, the first observation, the decode events and their softmaxed logits, the shadow LRU's
stall per decode step (``reward="stall_vs_lru"``) and the reference hit rates. A lane's reset copies the snapshot.

``supported`` says which options take this path: every option except ``warm`` (a lane's episodes share one cache,
so the prefill is not a pure function of the sequence) and a ``fallback`` other than lru (its eviction scores are
the plug-in's own); moe_env.vector_env runs those lanes as full single envs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding

from moe_env.cache import ExpertCacheState, event_flags
from moe_env.env import FREQ_DECAY, MoEOffloadEnv, ObservationBuilder, event_probabilities
from moe_env.errors import InvalidArgument, UsageError
from moe_env.policy import ModelSpec

INFO_KEYS = ("hit_rate", "hits", "misses", "stall_s", "tokens")  # MoEOffloadEnv's info, every step


def supported(env_kwargs: dict[str, Any]) -> bool:
    """Whether lanes of ``MoEOffloadEnv(**env_kwargs)`` run as arrays (else as single envs)."""
    return not env_kwargs.get("warm", False) and env_kwargs.get("fallback", "lru") == "lru"


class LaneFeatures:
    """ObservationBuilder's state and observation for many lanes at once (the same layout and floats: its
    docstring has the layout; tests/test_vector_env.py checks them bit for bit against single envs). Decode events
    only."""

    def __init__(self, spec: ModelSpec, capacity: int, count: int):
        layers, experts = spec.num_layers, spec.num_experts
        self.spec, self.capacity = spec, capacity
        self.size = ObservationBuilder(spec, capacity).size
        self.freq = np.zeros((count, layers, experts), dtype=np.float64)
        self.freq_step = np.zeros((count, layers), dtype=np.int64)
        self.last_token = np.zeros((count, layers, experts), dtype=np.int64)
        self.prev_experts = np.zeros((count, layers, experts), dtype=np.float32)
        self.uses = np.zeros((count, layers, experts), dtype=np.float64)
        self._powers = np.ones(1)  # FREQ_DECAY ** i as Python computes it (numpy's power may round differently)

    def load(self, lane: int, builder: ObservationBuilder) -> None:
        """Lane `lane` takes a single builder's state."""
        self.freq[lane] = builder._freq
        self.freq_step[lane] = builder._freq_step
        self.last_token[lane] = builder._last_token
        self.prev_experts[lane] = builder._prev_experts
        self.uses[lane] = builder._uses

    def powers(self, upto: int) -> np.ndarray:
        if upto >= len(self._powers):
            self._powers = np.array([FREQ_DECAY**i for i in range(2 * upto + 2)], dtype=np.float64)
        return self._powers

    def update(self, lanes: np.ndarray, layers: np.ndarray, tokens: np.ndarray, experts: np.ndarray) -> None:
        """ObservationBuilder.update for one decode event per lane (experts [lanes, k], distinct per row)."""
        behind = tokens - self.freq_step[lanes, layers]
        powers = self.powers(int(behind.max(initial=0)))
        self.freq[lanes, layers] *= powers[np.maximum(behind, 0)][:, None]  # x 1.0 where not behind: exact
        self.freq_step[lanes, layers] = np.where(behind > 0, tokens, self.freq_step[lanes, layers])
        rows, columns = lanes[:, None], layers[:, None]
        self.freq[rows, columns, experts] += 1.0
        self.uses[rows, columns, experts] += 1.0
        self.last_token[rows, columns, experts] = tokens[:, None]
        self.prev_experts[lanes, layers] = 0.0
        self.prev_experts[rows, columns, experts] = 1.0

    def observe(self, lanes: np.ndarray, layers: np.ndarray, steps: np.ndarray, experts: np.ndarray,
                lookahead: np.ndarray, has_lookahead: np.ndarray, gate: np.ndarray, slot_of: np.ndarray,
                pending: np.ndarray) -> np.ndarray:  # fmt: skip
        """ObservationBuilder.observation for one decode event per lane; slot_of / pending: every lane's cache
        arrays [all lanes, L, E] (slot or -1, in flight), read at the rows of `lanes`."""
        spec = self.spec
        num_layers, e = spec.num_layers, spec.num_experts
        count = len(lanes)
        rows = np.arange(count)
        targets = (layers + 1) % num_layers
        wraps = targets == 0
        tokens = np.maximum(steps, 0) + wraps
        obs = np.zeros((count, self.size), dtype=np.float32)
        obs[:, 0:e] = lookahead
        obs[:, e : 2 * e] = gate
        obs[rows[:, None], 2 * e + experts] = 1.0
        obs[:, 3 * e : 4 * e] = self.prev_experts[lanes, targets]
        obs[:, 4 * e : 5 * e] = slot_of[lanes, targets] >= 0
        in_flight = pending[lanes, targets]
        obs[:, 5 * e : 6 * e] = in_flight
        since = tokens[:, None] - self.last_token[lanes, targets]
        obs[:, 6 * e : 7 * e] = 1.0 / (1.0 + np.maximum(since, 0))
        gaps = np.maximum(tokens - self.freq_step[lanes, targets], 0)
        decay = self.powers(int(gaps.max(initial=0)))[gaps] * (1.0 - FREQ_DECAY)
        obs[:, 7 * e : 8 * e] = np.minimum(self.freq[lanes, targets] * decay[:, None], 1.0)
        obs[:, 8 * e : 9 * e] = self.uses[lanes, targets] * (1.0 / (tokens + 2.0))[:, None]
        obs[rows, 9 * e + targets] = 1.0
        base = 9 * e + num_layers
        obs[:, base] = has_lookahead
        obs[:, base + 1] = wraps
        obs[:, base + 2] = self.capacity / e
        copies = in_flight.sum(axis=1) + np.where(layers != targets, pending[lanes, layers].sum(axis=1), 0)
        obs[:, base + 3] = np.minimum(copies / self.capacity, 1.0)
        misses = (slot_of[lanes[:, None], layers[:, None], experts] < 0).sum(axis=1)
        obs[:, base + 4] = misses / max(spec.top_k, 1)
        return obs


class _Growing:
    """Rows appended per prepared sequence, in one array the kernel indexes (capacity doubles)."""

    def __init__(self, row_shape: tuple[int, ...], dtype: Any):
        self.data = np.zeros((16, *row_shape), dtype=dtype)
        self.size = 0

    def extend(self, rows: np.ndarray) -> None:
        need = self.size + len(rows)
        if need > len(self.data):
            grown = np.zeros((max(need, 2 * len(self.data)), *self.data.shape[1:]), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : need] = rows
        self.size = need


@dataclass
class _Sequence:
    """One prepared sequence: its decode events first..end-1 in the event columns, the state after its prefill."""

    first: int
    end: int
    tokens: int
    first_obs: np.ndarray
    cache: tuple[np.ndarray, ...]  # ints, flags, key_in, pools, scalars, stamp
    clock: tuple[float, float]  # the time line's now and link-free time
    ready: np.ndarray
    builder: ObservationBuilder


class ReplayLanes:
    """``count`` lanes of ``MoEOffloadEnv(**env_kwargs)`` (``supported`` options) stepped as arrays."""

    def __init__(self, env_kwargs: dict[str, Any], count: int):
        if not supported(env_kwargs):
            raise UsageError("warm lanes and fallbacks other than lru run as single envs (moe_env.vector_env)")
        from moe_env import cache_kernel, lane_kernel  # numba: imported with the first lanes

        self._step_lanes = lane_kernel.step_lanes
        self.template = MoEOffloadEnv(**env_kwargs)
        template = self.template
        self.trace = template.trace
        self.spec = spec = template.model_spec
        self.capacity = template.capacity
        self.count = count
        cache = template.replayer.cache
        ints, flags, key_in, pools, self._layer_pool, _, stamp, _, cand, _ = cache.kernel_arrays()
        self._shadow = template.reward_kind == "stall_vs_lru"
        layers, experts = spec.num_layers, spec.num_experts
        self.ints = np.zeros((count, *ints.shape), dtype=np.int64)
        self.flags = np.zeros((count, *flags.shape), dtype=np.bool_)
        self.key_in = np.zeros((count, *key_in.shape), dtype=np.int64)
        self.pools = np.zeros((count, *pools.shape), dtype=np.int64)
        self.scalars = np.zeros((count, cache_kernel.NUM_SCALARS), dtype=np.int64)
        self.stamp = np.zeros((count, *stamp.shape), dtype=np.int64)
        self._cache_state = (self.ints, self.flags, self.key_in, self.pools, self.scalars, self.stamp)
        self.cursor = np.zeros((count, 6), dtype=np.int64)
        self.cand = np.zeros((count, *cand.shape), dtype=np.int64)
        self.scores = np.zeros((count, layers, experts), dtype=np.float64)
        self.has_scores = np.zeros((count, layers), dtype=np.bool_)
        self.clock = np.zeros((count, 2), dtype=np.float64)
        self.ready = np.zeros((count, layers, experts), dtype=np.float64)
        self.hits = np.zeros(count, dtype=np.int64)
        self.misses = np.zeros(count, dtype=np.int64)
        self.stall = np.zeros(count, dtype=np.float64)
        self.position = np.zeros(count, dtype=np.int64)
        self.end = np.zeros(count, dtype=np.int64)
        self.tokens = np.zeros(count, dtype=np.int64)
        self.sequence = np.zeros(count, dtype=np.int64)
        self.features = LaneFeatures(spec, self.capacity, count)
        self._rngs: list[np.random.Generator | None] = [None] * count
        self.needs_reset = np.zeros(count, dtype=np.bool_)
        self._started = False
        k = spec.top_k
        self._ev_layer, self._ev_step, self._ev_flags = (_Growing((), np.int64) for _ in range(3))
        self._ev_experts = _Growing((k,), np.int64)
        self._lookahead, self._gate = _Growing((experts,), np.float32), _Growing((experts,), np.float32)
        self._has_lookahead = _Growing((), np.bool_)
        self._shadow_stall = _Growing((), np.float64)
        self._sequences: dict[int, _Sequence] = {}
        self._scratch, self._no_index = np.zeros((2, experts)), np.zeros(1, dtype=np.int64)
        self._no_counts, self._no_rng = np.zeros((1, 1, 1)), np.zeros(0)
        self._cost = template.cost
        self.size = self.features.size

    # -- preparation ------------------------------------------------------------------------------------------
    def _prepare(self, index: int) -> _Sequence:
        prepared = self._sequences.get(index)
        if prepared is not None:
            return prepared
        template = self.template
        first_obs, info = template.reset(options={"sequence": index})  # the prefill, replayed by the single env
        cache, replayer = template.replayer.cache, template.replayer
        spec = self.spec
        decode = template._decode
        events = [event for _, event in decode]
        if any(len(event.experts) != spec.top_k for event in events):
            raise UsageError(f"sequence {index}: a decode step routes other than top-{spec.top_k} experts")
        probabilities = [event_probabilities(event, spec.num_layers, spec.num_experts) for event in events]
        zeros = np.zeros(spec.num_experts, dtype=np.float32)
        first = self._ev_layer.size
        self._ev_layer.extend(np.array([event.layer for event in events], dtype=np.int64))
        self._ev_step.extend(np.array([event.step for event in events], dtype=np.int64))
        self._ev_flags.extend(np.array([event_flags(False, False, event.step) for event in events], dtype=np.int64))
        self._ev_experts.extend(np.array([event.experts for event in events], dtype=np.int64))
        self._lookahead.extend(np.array([zeros if p[0] is None else p[0] for p in probabilities], dtype=np.float32))
        self._gate.extend(np.array([p[1] for p in probabilities], dtype=np.float32))
        self._has_lookahead.extend(np.array([p[0] is not None for p in probabilities], dtype=np.bool_))
        if self._shadow:  # the shadow LRU replay does not depend on the actions: its stalls, once per sequence
            shadow = template._shadow
            assert shadow is not None
            self._shadow_stall.extend(np.array([shadow.process(routing).stall_s for routing, _ in decode]))
        else:
            self._shadow_stall.extend(np.zeros(len(events)))
        prepared = _Sequence(
            first=first,
            end=first + len(events),
            tokens=int(info["tokens"]),
            first_obs=first_obs,
            cache=tuple(a.copy() for a in _cache_arrays(cache)),
            clock=(replayer._now, replayer._link_free),  # the Replayer's time line after the prefill
            ready=np.array(replayer._ready, dtype=np.float64),
            builder=_copy_builder(template.builder),
        )
        self._sequences[index] = prepared
        return prepared

    # -- episodes ---------------------------------------------------------------------------------------------
    def _reset_lane(self, lane: int, seed: int | None, options: dict | None) -> np.ndarray:
        if seed is not None or self._rngs[lane] is None:
            self._rngs[lane], _ = seeding.np_random(seed)
        options = options or {}
        sequences = len(self.trace.sequences)
        if "sequence" in options:
            index = int(options["sequence"])
            if not 0 <= index < sequences:
                raise UsageError(f"sequence {index} outside 0..{sequences - 1}")
        else:
            rng = self._rngs[lane]
            assert rng is not None
            index = int(rng.integers(sequences))
        prepared = self._prepare(index)
        for array, value in zip(self._cache_state, prepared.cache, strict=True):
            array[lane] = value
        self.cursor[lane] = 0
        self.has_scores[lane] = False
        self.clock[lane] = prepared.clock
        self.ready[lane] = prepared.ready
        self.features.load(lane, prepared.builder)
        self.hits[lane] = self.misses[lane] = 0
        self.stall[lane] = 0.0
        self.position[lane], self.end[lane] = prepared.first, prepared.end
        self.tokens[lane] = prepared.tokens
        self.sequence[lane] = index
        self.needs_reset[lane] = False
        return prepared.first_obs

    def reset(self, seeds: list[int | None], options: dict | None, obs: np.ndarray) -> dict[str, np.ndarray]:
        for lane, seed in enumerate(seeds):
            obs[lane] = self._reset_lane(lane, seed, options)
        self._started = True
        return self._infos(np.zeros(self.count, dtype=np.bool_))

    def step(self, actions: np.ndarray, obs: np.ndarray, rewards: np.ndarray, terminated: np.ndarray,
             truncated: np.ndarray) -> dict[str, np.ndarray]:  # fmt: skip
        """One step of every lane (NEXT_STEP autoreset: a lane whose episode ended last step resets, reward 0,
        its action ignored); writes into the caller's arrays and returns the batched infos."""
        if not self._started:
            raise gym.error.ResetNeeded("call reset() before step()")
        resetting = np.flatnonzero(self.needs_reset)
        lanes = np.flatnonzero(~self.needs_reset) if len(resetting) else np.arange(self.count)
        for lane in resetting:
            obs[lane] = self._reset_lane(int(lane), None, None)
        rewards[:] = 0.0
        terminated[:] = False
        truncated[:] = False
        ended = np.zeros(self.count, dtype=np.bool_)
        if len(lanes):
            scores = _checked_actions(actions, lanes, self.spec.num_experts)
            self._step(lanes, scores, obs, rewards, ended)
        terminated[:] = ended
        self.needs_reset[:] = ended
        return self._infos(ended)

    def _step(self, lanes: np.ndarray, scores: np.ndarray, obs: np.ndarray, rewards: np.ndarray,
              ended: np.ndarray) -> None:  # fmt: skip
        cost = self._cost
        stalls = np.zeros(len(lanes), dtype=np.float64)
        events = self.position[lanes]
        experts = self._ev_experts.data
        self._step_lanes(lanes, scores, self.ints, self.flags, self.key_in, self.pools, self._layer_pool,
                         self.scalars, self.stamp, self.cursor, self.cand, self.scores, self.has_scores, self.clock,
                         self.ready, self.hits, self.misses, self.stall, self.position, self._ev_layer.data,
                         self._ev_step.data, self._ev_flags.data, experts, self.capacity, cost.expert_bytes,
                         cost.copy_s, cost.expert_compute_s, cost.layer_compute_s, stalls, self._scratch,
                         self._no_index, self._no_counts, self._no_rng)  # fmt: skip
        if self._shadow:
            stalls -= self._shadow_stall.data[events]
        rewards[lanes] = -1e3 * stalls
        steps = self._ev_step.data[events]
        self.features.update(lanes, self._ev_layer.data[events], np.maximum(steps, 0), experts[events])
        done = self.position[lanes] >= self.end[lanes]
        ended[lanes] = done
        obs[lanes[done]] = 0.0
        going, now = lanes[~done], self.position[lanes[~done]]
        if len(going):
            obs[going] = self.features.observe(
                going,
                self._ev_layer.data[now],
                self._ev_step.data[now],
                experts[now],
                self._lookahead.data[now],
                self._has_lookahead.data[now],
                self._gate.data[now],
                self.ints[:, 0],
                self.flags[:, 0],
            )

    def _infos(self, ended: np.ndarray) -> dict[str, np.ndarray]:
        """MoEOffloadEnv's infos batched as gymnasium's VectorEnv._add_info batches them (arrays, `_key` masks)."""
        total = self.hits + self.misses
        hit_rate = np.divide(self.hits, total, out=np.zeros(self.count), where=total > 0)
        every = np.ones(self.count, dtype=np.bool_)
        infos = {"hit_rate": hit_rate, "hits": self.hits.copy(), "misses": self.misses.copy(),
                 "stall_s": self.stall.copy(), "tokens": self.tokens.copy()}  # fmt: skip
        for key in INFO_KEYS:
            infos[f"_{key}"] = every.copy()
        if self.template.reference_metrics and ended.any():
            gap = np.zeros(self.count, dtype=np.float64)
            for lane in np.flatnonzero(ended):
                lru, belady = self.template.reference_hit_rates(int(self.sequence[lane]))
                rate = float(hit_rate[lane])
                gap[lane] = (rate - lru) / (belady - lru) if belady > lru else float("nan")
            infos["gap_captured"], infos["_gap_captured"] = gap, ended.copy()
        return infos


def _cache_arrays(cache: ExpertCacheState) -> tuple[np.ndarray, ...]:
    """The per-lane part of the state ExpertCacheState hands cache_kernel.advance (ints, flags, key_in, pools,
    scalars, stamp: what a sequence's prefill leaves; the layer -> pool map is shared, the rest is scratch)."""
    ints, flags, key_in, pools, _, scalars, stamp, *_ = cache.kernel_arrays()
    return ints, flags, key_in, pools, scalars, stamp


def _copy_builder(builder: ObservationBuilder) -> ObservationBuilder:
    copy = ObservationBuilder(builder.model_spec, builder.capacity)
    for name in ("_freq", "_freq_step", "_last_token", "_prev_experts", "_uses"):
        setattr(copy, name, getattr(builder, name).copy())
    return copy


def _checked_actions(actions: np.ndarray, lanes: np.ndarray, num_experts: int) -> np.ndarray:
    """The stepping lanes' actions as float64 (checked_action's refusals: NaN, inf, a wrong shape)."""
    array = np.asarray(actions)
    if array.dtype.kind not in "fiu":
        raise InvalidArgument(f"actions must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] != num_experts:
        raise InvalidArgument(f"actions must have shape (lanes, {num_experts}), got {array.shape}")
    chosen = np.ascontiguousarray(array[lanes], dtype=np.float64)
    if not np.isfinite(chosen).all():
        raise InvalidArgument("an action holds NaN or inf; scores must be finite (the action space is [-1, 1])")
    return chosen
