"""Gymnasium env: the cache's decision loop turned inside out, one decision per routed decode layer.

The agent never bypasses the cache: its action becomes the scores of an ``ActionPolicy`` (a plain Policy), so
``ExpertCacheState.route`` is consulted exactly as in the engine and the simulator, and the same Policy can be run
as a plug-in outside the env (agents/) with the same observation, computed by the same ``ObservationBuilder``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from moe_env.allocation import Allocation, build_allocation, parse_budget
from moe_env.cache import Counters
from moe_env.costmodel import CostModel
from moe_env.errors import InvalidArgument, UsageError
from moe_env.policy import CacheView, ModelSpec, Policy, RouteEvent, make_policy
from moe_env.routing import LayerRouting, route_events
from moe_env.sim import Replayer, cost_model_for, simulate
from moe_env.threads import set_threads
from moe_env.trace import Trace, TraceMeta, load_trace

ENV_ID = "moe_env/MoEOffload-v0"  # registered by moe_env/__init__.py
REWARDS = ("stall", "stall_vs_lru")
FREQ_DECAY = 0.9  # per token: the decayed frequency feature forgets a use after ~10 tokens


# ------------------------------------------------------------------------------------------- observation


def _softmax(logits: np.ndarray | None, n: int) -> np.ndarray:
    if logits is None:
        return np.zeros(n, dtype=np.float32)
    x = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(x).all():
        return np.zeros(n, dtype=np.float32)
    x = np.exp(x - x.max())
    return (x / x.sum()).astype(np.float32)


def event_probabilities(event: RouteEvent, num_layers: int, num_experts: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(lookahead probs of the target layer or None, gate probs of this layer): pure functions of the event's
    logits, memoised on the event (the replay env reuses a sequence's events in every episode)."""
    memo = event.extra.get("probabilities")
    if memo is None:
        wraps = event.layer + 1 >= num_layers
        lookahead = None if wraps or event.lookahead_logits is None else _softmax(event.lookahead_logits, num_experts)
        memo = (lookahead, _softmax(event.gate_logits, num_experts))
        event.extra["probabilities"] = memo
    return memo


class ObservationBuilder:
    """Features of the decision "layer l has routed; act on layer (l + 1) mod L". Stateful over one sequence.

    Call ``observation(event, cache)`` BEFORE the cache routes ``event`` and ``update(event)`` after; the env and
    the learned plug-ins both do exactly that (the plug-ins from Policy.observe), so their observations agree.
    Layout (E experts, L layers), all in [0, 1]:
      [0E:1E) lookahead probs of the target layer (softmax of gate_{l+1}(h_l); zeros when absent)
      [1E:2E) gate probs of layer l (the current router; zeros when absent)
      [2E:3E) experts selected by layer l now (multi-hot)
      [3E:4E) experts the target layer selected at the previous token (multi-hot)
      [4E:5E) resident mask of the target layer (in flight included)
      [5E:6E) in-flight mask of the target layer
      [6E:7E) recency of each target-layer expert: 1 / (1 + tokens since its last use), ~0 if never used
      [7E:8E) decayed use frequency of each target-layer expert (decay 0.9 per token, scaled to [0, 1])
      [8E:9E) long-run use frequency of each target-layer expert: uses this sequence / (tokens so far + 2)
      [9E:9E+L) one-hot of the target layer
      then: lookahead available, target wraps to the next token, capacity / E, in-flight copies of layers l and
            target / capacity (the link backlog as the cache sees it),
            expected demand misses of layer l / k
    """

    def __init__(self, spec: ModelSpec, capacity: int):
        self.model_spec = spec
        self.capacity = capacity
        num_layers, num_experts = spec.num_layers, spec.num_experts
        self.size = 9 * num_experts + num_layers + 5
        self._freq = np.zeros((num_layers, num_experts), dtype=np.float64)
        self._freq_step = np.zeros(num_layers, dtype=np.int64)  # token at which _freq[layer] was last decayed
        self._last_token = np.full((num_layers, num_experts), -(10**9), dtype=np.int64)
        self._prev_experts = np.zeros((num_layers, num_experts), dtype=np.float32)
        self._uses = np.zeros((num_layers, num_experts), dtype=np.float64)
        self._token = 0

    def reset(self) -> None:
        self.__init__(self.model_spec, self.capacity)

    def update(self, event: RouteEvent) -> None:
        """Account one routed event (prefill chunks count as uses at token 0). Scalar loops: k is small."""
        layer = event.layer
        token = max(event.step, 0)
        self._token = token
        freq, uses, last = self._freq[layer], self._uses[layer], self._last_token[layer]
        behind = token - int(self._freq_step[layer])
        if behind > 0:
            freq *= FREQ_DECAY**behind
            self._freq_step[layer] = token
        for x in event.experts:
            freq[x] += 1.0
            uses[x] += 1.0
            last[x] = token
        if not event.prefill:
            row = self._prev_experts[layer]
            row.fill(0.0)
            for x in event.experts:
                row[x] = 1.0

    def observation(self, event: RouteEvent, cache: CacheView) -> np.ndarray:
        spec = self.model_spec
        num_layers, e = spec.num_layers, spec.num_experts
        layer = event.layer
        target = (layer + 1) % num_layers
        wraps = target == 0
        token = max(event.step, 0) + (1 if wraps else 0)
        obs = np.zeros(self.size, dtype=np.float32)
        lookahead, gate = event_probabilities(event, num_layers, e)
        if lookahead is not None:
            obs[0:e] = lookahead
        obs[e : 2 * e] = gate
        for x in event.experts:
            obs[2 * e + x] = 1.0
        obs[3 * e : 4 * e] = self._prev_experts[target]
        for x in cache.resident(target):
            obs[4 * e + x] = 1.0
        in_flight = cache.in_flight(target)
        for x in in_flight:
            obs[5 * e + x] = 1.0
        since = token - self._last_token[target]  # never used: a huge gap, recency ~0
        obs[6 * e : 7 * e] = 1.0 / (1.0 + np.maximum(since, 0))
        decay = FREQ_DECAY ** max(token - int(self._freq_step[target]), 0) * (1.0 - FREQ_DECAY)
        obs[7 * e : 8 * e] = np.minimum(self._freq[target] * decay, 1.0)
        obs[8 * e : 9 * e] = self._uses[target] * (1.0 / (token + 2.0))  # <= 1: one use a token, + prefill
        obs[9 * e + target] = 1.0
        base = 9 * e + num_layers
        obs[base] = 0.0 if lookahead is None else 1.0
        obs[base + 1] = 1.0 if wraps else 0.0
        obs[base + 2] = self.capacity / e
        copies = len(in_flight) + (len(cache.in_flight(layer)) if layer != target else 0)
        obs[base + 3] = min(copies / self.capacity, 1.0)
        misses = sum(1 for x in event.experts if not cache.is_resident(layer, x))
        obs[base + 4] = misses / max(spec.top_k, 1)
        return obs


# ------------------------------------------------------------------------------------------------ action


class ActionPolicy(Policy):
    """A Policy whose decisions are per-expert scores in [-1, 1] for each layer, set from outside (an action).

    For the target layer: experts scoring > 0 that are not resident are prefetched, highest first, at most the
    ``capacity`` best-scoring ones; when a slot must be freed the lowest score is evicted (ties: least recently
    used). A layer with no scores yet (prefill, the first decode layer) uses the ``fallback`` policy's eviction
    scores (default: the base Policy, i.e. LRU) and no prefetch; the fallback observes every event, so a stateful
    heuristic stays exact and ``action_from_policy(fallback, ...)`` reproduces it.
    """

    name = "action"

    def __init__(self, fallback: Policy | None = None):
        self.fallback = fallback or Policy()

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        super().reset(spec, capacity)
        self.fallback.reset(spec, capacity)
        self.scores: list[np.ndarray | None] = [None] * spec.num_layers
        self._pending_target = -1

    def begin_sequence(self, cache: CacheView) -> None:
        """Per request (warm too): the last request's scores are stale, so its prefill is the fallback's again."""
        self.fallback.begin_sequence(cache)
        self.scores = [None] * self.spec.num_layers
        self._pending_target = -1

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        self.fallback.observe(event, cache)

    def set_scores(self, target: int, scores: np.ndarray) -> None:
        self.scores[target] = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), -1.0, 1.0)
        self._pending_target = target

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        scores = self.scores[layer]
        if scores is None:
            return self.fallback.eviction_scores(layer, candidates, cache)
        return scores[candidates]

    def prefetch(self, event: RouteEvent, cache: CacheView) -> Sequence[tuple[int, int]]:
        target = self._pending_target
        self._pending_target = -1
        if target < 0 or event.prefill:
            return ()
        scores = self.scores[target]
        best = np.argsort(-scores, kind="stable")[: self.capacity]
        return [(target, int(x)) for x in best if scores[x] > 0.0 and not cache.is_resident(target, int(x))]


def rank_scores(values: np.ndarray, low: float = -1.0, high: float = 0.0) -> np.ndarray:
    """Order-preserving map of arbitrary values into [low, high) (equal values get equal scores)."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse = np.unique(values, return_inverse=True)
    return low + (high - low) * inverse.astype(np.float64) / max(len(values), 1)


def action_from_policy(policy: Policy, event: RouteEvent, cache: CacheView) -> np.ndarray:
    """The env action that reproduces `policy` at this decision point.

    Eviction order: the policy's eviction scores over all experts of the target layer, rank-mapped into [-1, 0);
    its prefetches of non-resident experts of the target layer get scores in (0, 1] in priority order. Call it
    before ``env.step`` with the event and cache the env exposes (``env.unwrapped.current_event``, ``.cache``).
    A stateful policy must observe every event: use the env's fallback (``env.unwrapped.policy.fallback``).
    """
    spec = policy.spec
    target = (event.layer + 1) % spec.num_layers
    everyone = np.arange(spec.num_experts, dtype=np.int64)
    scores = rank_scores(policy.eviction_scores(target, everyone, cache))
    # a prefetch of a resident expert is a no-op for the policy: leave its eviction rank alone
    wanted = [x for (m, x) in policy.prefetch(event, cache) if m == target and not cache.is_resident(m, x)]
    for rank, expert in enumerate(wanted[: cache.capacity]):
        scores[expert] = 1.0 - rank / (2.0 * cache.capacity)
    return scores.astype(np.float32)


# ---------------------------------------------------------------------------------------------------- env


class MoEOffloadEnv(gym.Env):
    """Expert offloading as an MDP: one step per routed decode layer of one sequence.

    OBSERVATION: Box [0, 1]^(9E + L + 5) built by ``ObservationBuilder`` at the decision point "layer l has routed
    (its experts, gate logits and the lookahead logits for l + 1 are known), layer l + 1 has not": lookahead probs
    for the target layer, the current gate probs and selection, the target layer's previous-token selection,
    resident and in-flight masks, recency, decayed and long-run frequency, target-layer one-hot, lookahead
    available, wrap to the next token, capacity / E, in-flight copies / capacity, expected demand misses of layer l.
    The target of the last layer's decision is layer 0 of the next token (no lookahead signal there).

    ACTION: Box [-1, 1]^E, a score per expert of the target layer (``ActionPolicy``): experts scoring > 0 that are
    not resident are prefetched (best first, at most ``capacity``), the lowest score is evicted whenever the target
    layer needs a slot (for the prefetches and for its own demand misses, which are always forced). Eviction and
    prefetch in one action; every heuristic is expressible (``action_from_policy``).

    REWARD: minus the modeled stall in ms (moe_env.sim.Replayer's cost model: one FIFO link, copies overlap
    compute) of the layer routed in this step (``reward="stall"``), or minus the stall in excess of what rolling
    LRU without prefetch stalls on the same layer and token (``"stall_vs_lru"``, a shadow replay). The action of a
    step takes effect from this step's prefetches on; its target layer is routed (and stalls) in the next step.

    EPISODE: one sequence of a trace (chosen with the env's seeded RNG, or ``options={"sequence": i}``); its
    prefill is replayed with the ``fallback`` policy (LRU) and no prefetch before the first decision; it ends after
    the last decode layer. ``action_from_policy(env.policy.fallback, env.current_event, env.cache)`` replays the
    fallback heuristic exactly (``fallback="belady"`` etc.), as the parity tests do.
    ``info``: hit_rate, hits, misses, stall_s, tokens so far (decode); the last step adds gap_captured =
    (hit_rate - LRU) / (Belady - LRU) on this sequence (references without prefetch, as in ``moe-env bench``).

    Backends: ``replay`` (this class: a Trace and the cost model); ``live`` (``LiveMoEOffloadEnv`` below: the real
    engine decoding prompts, same spaces and reward).
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium's convention)

    def __init__(
        self,
        trace: Trace | str = "builtin:tiny-mixtral/train",
        capacity: int | None = None,
        reward: str = "stall",
        profile: str | CostModel | None = None,
        reference_metrics: bool = True,
        fallback: str = "lru",
        budget: str | None = None,
        allocation: str = "uniform",
        warm: bool = False,
        prefill: str = "chunked",
    ):
        """``budget`` (moe_env.allocation.parse_budget) replaces ``capacity`` (slots per layer) as the total;
        ``allocation`` lays it out (uniform, shared, profile:TRACE; shared needs a fallback that ranks across
        layers, which the agent's per-layer scores do not: refused); ``warm``: episodes follow the trace's
        sequences in order through one cache (a request stream; cold again when it wraps around)."""
        if reward not in REWARDS:
            raise UsageError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
        trace = env_trace(trace)
        meta = trace.meta
        self.trace = trace
        self.cost = cost_model_for(meta, profile)
        layout = env_allocation(meta, self.cost.expert_bytes, capacity, budget, allocation)
        self.reward_kind = reward
        self.reference_metrics = reference_metrics
        self.warm = warm
        self.policy = ActionPolicy(make_policy(fallback))
        self.replayer = Replayer(meta, self.policy, layout, self.cost, with_oracle=True, prefill=prefill, warm=warm)
        self.capacity = self.replayer.cache.capacity  # the most slots one layer holds (the observation's scale)
        if warm:
            self.replayer.begin_stream(trace.sequences)
        self.model_spec = self.replayer.spec
        self.builder = ObservationBuilder(self.model_spec, self.capacity)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(self.builder.size,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(meta.num_experts,), dtype=np.float32)
        self._routings: dict[int, tuple[list[LayerRouting], list[tuple[LayerRouting, RouteEvent]]]] = {}
        self._references: dict[int, tuple[float, float]] = {}
        self._shadow: Replayer | None = None
        self._started = False
        self.sequence_index = 0
        self._decode: list[tuple[LayerRouting, RouteEvent]] = []
        self._cursor = 0
        self.stats = EpisodeStats()

    @staticmethod
    def observation_size(spec: ModelSpec) -> int:
        return ObservationBuilder(spec, spec.top_k).size

    @property
    def cache(self) -> CacheView:
        return self.replayer.cache

    @property
    def current_event(self) -> RouteEvent:
        """The decode event whose decision is pending (what the observation describes)."""
        return self._decode[self._cursor][1]

    def share_sequence_cache(self, other: MoEOffloadEnv) -> None:
        """Use `other`'s per-sequence caches (routings, decode events, reference hit rates): read-only data of the
        same trace, so the lanes of a vector env prepare each sequence once, not once per lane."""
        if other.trace is not self.trace or other.capacity != self.capacity:
            raise ValueError("only envs over the same trace and capacity can share their sequence caches")
        self._routings, self._references = other._routings, other._references

    def _sequence(self, index: int) -> tuple[list[LayerRouting], list[tuple[LayerRouting, RouteEvent]]]:
        if index not in self._routings:
            prefill, decode = [], []
            for routing in self.trace.sequences[index].routings():
                if routing.prefill:
                    prefill.append(routing)
                else:
                    (event,) = route_events(routing, self.replayer.cache)
                    decode.append((routing, event))
            if not decode:
                raise UsageError(f"sequence {index} of the trace has no decode steps")
            self._routings[index] = (prefill, decode)
        return self._routings[index]

    def _process(self, routing: LayerRouting) -> float:
        outcome = self.replayer.process(routing)
        for plan in outcome.plans:
            self.builder.update(plan.event)
        if not routing.prefill:
            self.stats.hits += outcome.hits
            self.stats.misses += outcome.misses
            self.stats.stall_s += outcome.stall_s
        return outcome.stall_s

    def _info(self) -> dict:
        s = self.stats
        return {"hit_rate": s.hit_rate, "hits": s.hits, "misses": s.misses, "stall_s": s.stall_s, "tokens": s.tokens}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "sequence" in options:
            index = int(options["sequence"])
            if not 0 <= index < len(self.trace.sequences):
                raise UsageError(f"sequence {index} outside 0..{len(self.trace.sequences) - 1}")
        elif self.warm:  # a request stream: the next sequence in order
            index = (self.sequence_index + 1) % len(self.trace.sequences) if self._started else 0
        else:
            index = int(self.np_random.integers(len(self.trace.sequences)))
        self.sequence_index = index
        sequence = self.trace.sequences[index]
        prefill, self._decode = self._sequence(index)
        self._cursor = 0
        self.stats = EpisodeStats(tokens=sequence.num_steps)
        if self.warm and index == 0 and self._started:
            self.replayer.cache.begin_sequence()  # the stream wrapped around: start it cold again
        self.replayer.begin_sequence(sequence)
        self._started = True
        self.builder.reset()
        if self.reward_kind == "stall_vs_lru":
            if self._shadow is None or not self.warm:
                layout = self.replayer.cache.allocation
                self._shadow = Replayer(self.trace.meta, make_policy("lru"), layout, self.cost, warm=self.warm)
            self._shadow.begin_sequence(sequence)
        for routing in prefill:
            self._process(routing)
            if self._shadow is not None:
                self._shadow.process(routing)
        return self.builder.observation(self.current_event, self.cache), self._info()

    def step(self, action):
        if self._cursor >= len(self._decode):
            raise gym.error.ResetNeeded("the episode has ended: call reset() before step()")
        action = checked_action(action, self.model_spec.num_experts)
        routing, event = self._decode[self._cursor]
        self.policy.set_scores((event.layer + 1) % self.model_spec.num_layers, action)
        stall = self._process(routing)
        if self._shadow is not None:
            stall -= self._shadow.process(routing).stall_s
        self._cursor += 1
        terminated = self._cursor >= len(self._decode)
        info = self._info()
        if terminated:
            self.replayer.cache.finish()
            if self.reference_metrics:
                info["gap_captured"] = self.gap_captured(self.stats.hit_rate)
            obs = np.zeros(self.builder.size, dtype=np.float32)
        else:
            obs = self.builder.observation(self.current_event, self.cache)
        return obs, float(-1e3 * stall), terminated, False, info

    def gap_captured(self, hit_rate: float) -> float:
        """(hit_rate - LRU) / (Belady - LRU) on the current sequence (NaN when Belady = LRU)."""
        lru, belady = self.reference_hit_rates(self.sequence_index)
        return (hit_rate - lru) / (belady - lru) if belady > lru else float("nan")

    def reference_hit_rates(self, index: int) -> tuple[float, float]:
        """Decode hit rates of LRU and Belady (no prefetch) on one sequence, computed once."""
        if index not in self._references:
            one = Trace(self.trace.meta, [self.trace.sequences[index]])
            self._references[index] = tuple(  # type: ignore[assignment]
                simulate(one, name, self.replayer.cache.allocation, self.cost).hit_rate for name in ("lru", "belady")
            )
        return self._references[index]


@dataclass
class EpisodeStats:
    hits: int = 0
    misses: int = 0
    stall_s: float = 0.0
    tokens: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def env_trace(trace: Trace | str) -> Trace:
    """The trace a replay env runs: a Trace, or a spec loaded (moe_env.trace.load_trace); refused without sequences."""
    if isinstance(trace, str):
        trace = load_trace(trace)
    if not trace.sequences:
        raise UsageError("the trace holds no sequences")
    return trace


def env_allocation(
    meta: TraceMeta, expert_bytes: int, capacity: int | None, budget: str | None, allocation: str
) -> int | Allocation:
    """Slots per layer (the default: half the experts) or, with a budget or a non-uniform allocation, a layout."""
    if budget is None and allocation.strip() == "uniform":
        return checked_capacity(capacity, meta.num_experts, meta.top_k)
    if budget is not None and capacity is not None:
        raise UsageError("give the env a capacity (slots per layer) or a budget, not both")
    if budget is not None:
        total = parse_budget(budget).total_slots(meta.num_layers, meta.num_experts, expert_bytes)
    else:
        total = checked_capacity(capacity, meta.num_experts, meta.top_k) * meta.num_layers
    return build_allocation(allocation, total, meta.num_layers, meta.num_experts, meta.top_k, load_trace)


def default_capacity(num_experts: int, top_k: int) -> int:
    """Half the experts of a layer (at least top-k): the regime where policies differ most."""
    return max(top_k, num_experts // 2)


def checked_capacity(capacity: Any, num_experts: int, top_k: int) -> int:
    """`capacity` as slots per layer (None: ``default_capacity``); anything else than an integer in
    top_k..num_experts raises InvalidArgument (0 is refused, never replaced by the default)."""
    if capacity is None:
        return default_capacity(num_experts, top_k)
    if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer):
        raise InvalidArgument(f"capacity must be an integer number of slots per layer, got {capacity!r}")
    if not top_k <= capacity <= num_experts:
        raise InvalidArgument(
            f"capacity {capacity} outside {top_k}..{num_experts} slots per layer: a layer must hold its "
            f"top-{top_k} experts at once"
        )
    return int(capacity)


def checked_action(action: Any, num_experts: int) -> np.ndarray:
    """The action as float64 scores, one per expert; wrong length, shape or dtype, NaN or inf raise
    InvalidArgument (an agent's bug must not be clipped or broadcast into a silent decision)."""
    array = np.asarray(action)
    if array.dtype.kind not in "fiu":
        raise InvalidArgument(f"action must hold real numbers, got dtype {array.dtype}")
    if array.shape != (num_experts,):
        raise InvalidArgument(f"action must have shape ({num_experts},), one score per expert, got {array.shape}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise InvalidArgument("action holds NaN or inf; scores must be finite (the action space is [-1, 1])")
    return array


def rollout(
    env: MoEOffloadEnv, choose: Callable[[np.ndarray, MoEOffloadEnv], np.ndarray], sequence: int, seed: int = 0
) -> dict:
    """Run one episode with `choose(obs, env) -> action`; returns the final info."""
    obs, info = env.reset(seed=seed, options={"sequence": sequence})
    terminated = False
    while not terminated:
        obs, _, terminated, _, info = env.step(choose(obs, env))
    return info


# ------------------------------------------------------------------------------------------------ live backend


class _EpisodeAborted(BaseException):
    """Raised inside the engine's thread to stop a generate that the env no longer wants (reset/close)."""


class LiveMoEOffloadEnv(gym.Env):
    """The same MDP over the real OffloadEngine: a model decodes prompts while the agent makes the decisions.

    Inversion of control: ``engine.generate`` runs in a worker thread; the engine's routing observer (called
    before each layer's experts are acquired) builds the observation from the engine's own cache, hands it to
    ``step`` and waits for the action, which becomes the scores of the engine's ActionPolicy. Spaces, decision
    point and action semantics are MoEOffloadEnv's. The reward is the cost model's stall for the same plans: a
    lockstep Replayer with an identical ActionPolicy routes the same routings (its counters equal the engine's,
    which the tests check); the engine's own measured metrics (wall-clock stall, tokens/s) arrive in the last
    ``info`` under ``engine``. Episode: one prompt, ``max_new_tokens`` greedy tokens (warm: the next prompt of one
    request stream). ``threads``: torch CPU threads for the decode (process-wide; None leaves torch's setting alone;
    the commands use moe_env.threads's default).
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium's convention)

    def __init__(
        self,
        model: Any = "tiny-mixtral",
        prompts: str | Sequence[str | Sequence[int]] = "builtin:train",
        max_new_tokens: int = 32,
        capacity: int | None = None,
        reward: str = "stall",
        profile: str | CostModel | None = None,
        fallback: str = "lru",
        threads: int | None = None,
        budget: str | None = None,
        allocation: str = "uniform",
        prefill: str = "chunked",
        warm: bool = False,
    ):
        """``budget``, ``allocation`` and ``prefill`` as in the engine (``EngineConfig.cache_budget`` etc.:
        ``6GiB``, ``0.25`` or total slots; uniform, shared or profile:TRACE; chunked or bypass); ``capacity``
        (slots per layer) and ``budget`` exclude each other. Checked before the model loads. A shared pool needs
        a policy that ranks victims across layers, which the agent's per-layer scores do not: refused.
        ``warm``: episodes are one request stream (``EngineConfig.warm``, as the replay env's ``warm``): the prompts
        in order through one cache, the policies' persistent state kept; cold again when the stream wraps around."""
        import queue

        from moe_env.engine import EngineConfig, OffloadEngine, check_cache_options, load_model
        from moe_env.models import adapter_for
        from moe_env.trace import TraceMeta

        if reward != "stall":
            raise UsageError("the live backend supports reward='stall' only")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 2:
            raise InvalidArgument(
                f"max_new_tokens must be an integer >= 2 (one decision per token), got {max_new_tokens!r}"
            )
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise InvalidArgument(f"threads must be an integer >= 1 or None, got {threads!r}")
            set_threads(threads)
        config = EngineConfig(cache_budget=budget, allocation=allocation, prefill=prefill, warm=bool(warm))
        check_cache_options(config)  # a bad budget, allocation or prefill mode fails before the model loads
        if budget is not None and capacity is not None:
            raise UsageError("give the live env a capacity (slots per layer) or a budget, not both")
        if isinstance(model, str):
            model, tokenizer, _ = load_model(model, None)
        else:
            tokenizer = None
        adapter = adapter_for(model)
        if budget is None:
            config.cache_slots = checked_capacity(capacity, adapter.num_experts, adapter.top_k)
        config.policy = self.policy = ActionPolicy(make_policy(fallback))
        self.engine = OffloadEngine.from_model(model, config, tokenizer)
        self.engine.add_observer(self._observe)
        self.model_spec = self.engine.spec
        self.layout = self.engine.cache_state.allocation
        self.capacity = self.engine.cache_state.capacity  # the most slots one layer holds (the observation's scale)
        self.prefill = prefill
        if isinstance(prompts, str):  # a prompt-set spec (moe_env.prompts)
            from moe_env.prompts import load_prompts

            prompts = [p.text for p in load_prompts(prompts)]
        if not prompts:
            raise UsageError("the live env needs at least one prompt")
        for i, prompt in enumerate(prompts):  # every prompt fits the model's context before any episode starts
            self.engine.check_context(self.engine.encode(prompt), max_new_tokens, where=f"prompt {i}")
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        spec = self.model_spec
        meta = TraceMeta(
            spec.name, spec.num_layers, spec.num_experts, spec.top_k, "live", expert_bytes=spec.expert_bytes
        )
        self.cost = cost_model_for(meta, profile)
        self.warm = bool(warm)
        self.shadow = Replayer(meta, ActionPolicy(make_policy(fallback)), self.layout, self.cost, prefill=prefill,
                               warm=self.warm)  # fmt: skip
        self._started = False
        self.prompt_index = 0
        self.builder = ObservationBuilder(spec, self.capacity)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(self.builder.size,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(spec.num_experts,), dtype=np.float32)
        self._to_env: queue.Queue = queue.Queue()
        self._to_engine: queue.Queue = queue.Queue()
        self._worker: Any = None
        self._unaccounted: list[RouteEvent] = []
        self._stall = 0.0  # decode stall since the last observation (the next reward)
        self._episode_stall = 0.0
        self.current_event: RouteEvent | None = None

    @property
    def cache(self) -> CacheView:
        return self.engine.cache_state

    # -- engine thread ---------------------------------------------------------------------------------------
    def _observe(self, routing: LayerRouting) -> None:
        for event in self._unaccounted:
            self.builder.update(event)
        events = list(route_events(routing, self.engine.cache_state))
        self._unaccounted = events
        if not routing.prefill:
            event = events[0]
            self._to_env.put(("obs", self.builder.observation(event, self.engine.cache_state), event, self._stall))
            self._stall = 0.0
            action = self._to_engine.get()
            if action is None:
                raise _EpisodeAborted
            target = (event.layer + 1) % self.model_spec.num_layers
            self.policy.set_scores(target, action)
            self.shadow.policy.set_scores(target, action)  # type: ignore[attr-defined]
        stall = self.shadow.process(routing).stall_s
        if not routing.prefill:
            self._stall += stall
            self._episode_stall += stall

    def _run(self, prompt: str | Sequence[int]) -> None:
        try:
            result = self.engine.generate(prompt, self.max_new_tokens)
            self._to_env.put(("done", result, None, self._stall))
        except _EpisodeAborted:
            self._to_env.put(("aborted", None, None, 0.0))
        except Exception as exc:  # surfaced in the env's thread
            self._to_env.put(("error", exc, None, 0.0))

    # -- gym API ---------------------------------------------------------------------------------------------
    def _stop_worker(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            self._to_engine.put(None)
            while self._to_env.get()[0] not in ("aborted", "done", "error"):
                self._to_engine.put(None)
            self._worker.join()
        self._worker = None

    def _receive(self):
        kind, payload, event, stall = self._to_env.get()
        if kind == "error":
            raise payload
        return kind, payload, event, stall

    def _info(self) -> dict:
        c = self.shadow.cache.counters
        return {"hit_rate": c.hit_rate, "hits": c.hits, "misses": c.misses, "stall_s": self._episode_stall}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        import threading

        super().reset(seed=seed)
        self._stop_worker()
        options = options or {}
        if "prompt" in options:
            index = int(options["prompt"])
        elif self.warm:  # a request stream: the next prompt in order
            index = (self.prompt_index + 1) % len(self.prompts) if self._started else 0
        else:
            index = int(self.np_random.integers(len(self.prompts)))
        if not 0 <= index < len(self.prompts):
            raise UsageError(f"prompt {index} outside 0..{len(self.prompts) - 1}")
        self.prompt_index = index
        if not self.warm:
            self.shadow = Replayer(self.shadow.meta, self.shadow.policy, self.layout, self.cost, prefill=self.prefill)
        elif index == 0 and self._started:  # the stream wrapped around: start it cold again, engine and replay
            self.engine.runtime.begin_sequence(warm=False)
            self.shadow.cache.begin_sequence(warm=False)
        self._started = True
        self.shadow.begin_sequence()
        self.shadow.cache.counters = Counters()  # per episode, as the engine counts per generate
        self.builder.reset()
        self._unaccounted, self._stall, self._episode_stall = [], 0.0, 0.0
        self._worker = threading.Thread(target=self._run, args=(self.prompts[index],), daemon=True)
        self._worker.start()
        kind, obs, event, _ = self._receive()
        if kind != "obs":
            raise UsageError("the prompt produced no decode step: raise max_new_tokens above 1")
        self.current_event = event
        return obs, self._info()

    def step(self, action):
        if self._worker is None:
            raise gym.error.ResetNeeded("no episode is running: call reset() before step()")
        self._to_engine.put(checked_action(action, self.model_spec.num_experts))
        kind, payload, event, stall = self._receive()
        info = self._info()
        if kind == "done":
            self._worker.join()
            self._worker = None
            self.shadow.cache.finish()
            info["engine"] = payload.metrics
            info["tokens"] = len(payload.tokens)
            info["token_ids"] = list(payload.tokens)  # the decoded tokens (the unmodified model's, bit for bit)
            return np.zeros(self.builder.size, dtype=np.float32), float(-1e3 * stall), True, False, info
        self.current_event = event
        return payload, float(-1e3 * stall), False, False, info

    def close(self) -> None:
        self._stop_worker()
        self.engine.close()


def make_env(backend: str = "replay", **kwargs: Any) -> gym.Env:
    """The gymnasium entry point: ``gym.make("moe_env/MoEOffload-v0", backend="live", model=..., prompts=...)``."""
    if backend == "replay":
        return MoEOffloadEnv(**kwargs)
    if backend == "live":
        return LiveMoEOffloadEnv(**kwargs)
    raise UsageError(f"unknown env backend {backend!r}; choose replay or live")
