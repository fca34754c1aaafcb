"""The eviction-decision env: one step per eviction the cache must make, over a replay of a trace.

It lives in agents/ (not moe_env/) because its observation is the candidate feature rows of
agents/candidate_features.py, the same rows the imitation plug-in scores; so a scorer trained here (agents/ppo.py)
runs as a plug-in on any shape, and a scorer from imitation decides here exactly as it does there.

How the loop is turned inside out without threads: before the cache routes an event, the env knows which of the
event's experts will miss and how many must evict (a per-layer pool, demand only: no prefetch, nothing in flight),
and which residents are candidates (the residents less the event's own experts, ascending, as the cache lists them).
It asks the agent for every victim first, then routes the event through ``ExpertCacheState.route`` (the one
decision point) with a policy that scores the chosen victims lowest in order; that policy checks that the cache
asks exactly about the predicted candidates, so the prediction can never silently drift from the cache.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, replace

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from moe_env.agents.candidate_features import NUM_FEATURES, ModelTables
from moe_env.agents.imitation import CandidateFeaturePolicy

from moe_env.cache import ExpertCacheState
from moe_env.env import env_trace
from moe_env.errors import InvalidArgument, UsageError
from moe_env.policy import CacheView, RouteEvent
from moe_env.routing import route_events
from moe_env.sim import TraceOracle, model_spec, simulate
from moe_env.trace import SequenceTrace, Trace

ENV_ID = "moe_env/EvictionDecision-v0"  # registered by moe_env/__init__.py
REWARDS = ("belady", "regret", "misses")
MASK_COLUMN = NUM_FEATURES  # the observation's last column: 1 for a real candidate, 0 for padding


def default_capacities(num_experts: int, top_k: int) -> list[int]:
    """About 1/8, 1/4 and 1/2 of the experts (each above top-k and below E): the budgets imitation trains at."""
    from moe_env.agents.imitation import default_capacities as imitation_capacities

    return imitation_capacities(num_experts, top_k)


class ChosenVictims(CandidateFeaturePolicy):
    """Evicts the victims the agent chose, in order; keeps the candidate features up to date (``prepare``)."""

    name = "eviction-env"

    def __init__(self, tables: ModelTables | None):
        self.tables = tables
        self.features = None
        self._prepared: RouteEvent | None = None
        self.plan: list[tuple[list[int], int]] = []  # (candidates the cache will offer, victim) per eviction

    def prepare(self, event: RouteEvent, cache: CacheView) -> None:
        """Account `event` in the features before the agent decides (route's observe then skips it)."""
        self.features.update(event, cache.clock)
        self._prepared = event

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        if event is not self._prepared:
            super().observe(event, cache)
        self._prepared = None

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        if not self.plan:
            raise RuntimeError("eviction env: the cache evicted where no eviction was predicted")
        expected, victim = self.plan.pop(0)
        if candidates.tolist() != expected:
            raise RuntimeError(f"eviction env: the cache offered {candidates.tolist()}, the env predicted {expected}")
        scores = np.ones(len(candidates))
        scores[expected.index(victim)] = 0.0
        return scores


@dataclass
class Decision:
    """A pending decision: the layer, its candidates (ascending) and their feature rows."""

    layer: int
    candidates: list[int]
    rows: np.ndarray


class EvictionDecisionEnv(gym.Env):
    """Expert eviction as an MDP: one step per eviction with at least two candidates, over one sequence of a trace.

    OBSERVATION: Box [max_candidates, NUM_FEATURES + 1] float32: row i is candidate i's feature row
    (agents/candidate_features.py: recency, counts, shares, transition/co-activation/token statistics, gate and
    lookahead signals, layer position, budget...), candidates in ascending expert id; the last column is 1 for a
    real candidate, 0 for padding (all-zero rows past the candidates).

    ACTION: Discrete(max_candidates): the index of the candidate to evict. An index past the real candidates (a
    padding row, which a masked policy never picks) evicts candidate ``index mod n``; indices outside the space are
    refused with InvalidArgument.

    REWARD: ``"belady"`` (per decision, against Belady's per-event outcome): (log(1 + d_victim) - log(1 + d_far)) /
    log(1 + H) in [-1, 0], with d the accesses until a candidate's next use capped at H (``horizon_tokens`` tokens of
    accesses) and d_far the farthest among the candidates (Belady's choice: reward 0). ``"regret"``: minus the miss
    the choice may cost against Belady's: -1 if the victim is used again before Belady's victim (d_victim < d_far,
    within H: swapping the two evictions costs at most that one miss), else 0; it weighs every wrong choice
    alike, where ``"belady"`` barely penalises one between two far candidates. ``"misses"``: minus the decode
    misses routed between this decision and the next (the episode's return is minus its misses after the first
    decision).

    EPISODE: one sequence (the env's seeded RNG, or ``options={"sequence": i}``) at one capacity of ``capacities``
    (drawn per episode, or ``options={"capacity": c}``), cold; prefill evictions are decisions too (the plug-in
    scores them as well). It ends after the last routed event. ``info``: hit_rate, hits, misses (decode), decisions,
    capacity; the last step adds gap_captured = (hit_rate - LRU) / (Belady - LRU) on this sequence and capacity.
    Sequences with no eviction decision are skipped (refused if none of the trace has one).

    Candidate features start every episode from ``tables`` (the imitation plug-in's shipped tables of the shape by
    default) plus the episode's own online statistics, so ``reset(seed=...)`` is deterministic (the plug-in also
    carries its online statistics across the sequences of a run: a small shift, as the tables dominate them).
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium's convention)

    def __init__(
        self,
        trace: Trace | str,
        capacities: list[int] | int | None = None,
        reward: str = "belady",
        max_candidates: int | None = None,
        tables: ModelTables | str | None = "shipped",
        horizon_tokens: float = 64.0,
        reference_metrics: bool = True,
    ):
        if reward not in REWARDS:
            raise UsageError(f"unknown reward {reward!r} for the eviction env; choose one of {', '.join(REWARDS)}")
        trace = env_trace(trace)
        meta = trace.meta
        self.trace = trace
        self.model_spec = model_spec(meta)
        if capacities is None:
            capacities = default_capacities(meta.num_experts, meta.top_k)
        self.capacities = [capacities] if isinstance(capacities, int) else list(capacities)
        for capacity in self.capacities:
            if isinstance(capacity, bool) or not meta.top_k <= int(capacity) <= meta.num_experts:
                raise InvalidArgument(f"capacity {capacity!r} outside {meta.top_k}..{meta.num_experts} slots per layer")
        self.max_candidates = int(max_candidates or max(self.capacities))
        if self.max_candidates < max(self.capacities) - 1:
            raise InvalidArgument(f"max_candidates {self.max_candidates} is below the {max(self.capacities) - 1} "
                                  f"candidates a {max(self.capacities)}-slot layer can offer")  # fmt: skip
        self.reward_kind = reward
        self.reference_metrics = reference_metrics
        self.horizon = horizon_tokens * meta.num_layers * meta.top_k  # in accesses
        self._tables = _resolve_tables(tables, self.model_spec)
        self._caches: dict[int, ExpertCacheState] = {}
        self._references: dict[tuple[int, int], tuple[float, float]] = {}
        self._no_decisions: set[tuple[int, int]] = set()
        self._vocab = meta.extra.get("vocab") if isinstance(meta.extra, dict) else None
        width = NUM_FEATURES + 1
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(self.max_candidates, width), dtype=np.float32)
        self.action_space = spaces.Discrete(self.max_candidates)
        self._episode: Generator[Decision, int, None] | None = None
        self._decision: Decision | None = None
        self._pending_misses = 0
        self.hits = self.misses = self.decisions = 0
        self.sequence_index = 0
        self.capacity = self.capacities[0]

    # -- episode -----------------------------------------------------------------------------------------------
    def _cache(self, capacity: int) -> ExpertCacheState:
        if capacity not in self._caches:
            self._caches[capacity] = ExpertCacheState(self.model_spec, capacity, ChosenVictims(self._tables))
        return self._caches[capacity]

    @property
    def cache(self) -> CacheView:
        return self._cache(self.capacity)

    def _events(self, sequence: SequenceTrace, cache: ExpertCacheState):
        for routing in sequence.routings():
            vocab = self._vocab  # as moe_env.sim.Replayer: ids of an import mean nothing elsewhere
            if vocab is not None and isinstance(routing.token, int) and 0 <= routing.token < len(vocab):
                routing = replace(routing, token=vocab[routing.token])
            yield from route_events(routing, cache)

    def _run(self, sequence: SequenceTrace, cache: ExpertCacheState) -> Generator[Decision, int, None]:
        """Routes the sequence; yields each decision and receives the victim's candidate index."""
        policy: ChosenVictims = cache.policy  # type: ignore[assignment]
        for event in self._events(sequence, cache):
            policy.prepare(event, cache)
            layer = event.layer
            resident = set(cache.resident(layer))
            evictions = 0
            if not event.bypass:
                missing = sum(1 for e in event.experts if e not in resident)
                evictions = max(0, missing - (cache.layer_capacity(layer) - len(resident)))
            candidates = sorted(resident - set(event.experts))
            plan = []
            for _ in range(evictions):
                if len(candidates) >= 2:
                    rows = policy.features.layer_rows(layer, cache)[candidates]
                    index = yield Decision(layer, list(candidates), rows)
                    victim = candidates[index]
                else:
                    victim = candidates[0]
                plan.append((list(candidates), victim))
                candidates.remove(victim)
            policy.plan = plan
            result = cache.route(event)
            if policy.plan:
                raise RuntimeError("eviction env: the cache made fewer evictions than predicted")
            if not event.prefill:
                misses = result.hit.count(False)
                self.hits += len(result.hit) - misses
                self.misses += misses
                self._pending_misses += misses

    def _start(self, index: int, capacity: int) -> bool:
        """Start sequence `index` at `capacity`; False if it ends without a decision."""
        self.sequence_index, self.capacity = index, capacity
        cache = self._cache(capacity)
        sequence = self.trace.sequences[index]
        cache.policy.features = None  # every episode starts from the tables alone: reset(seed) is deterministic
        cache.oracle = TraceOracle(sequence, self.model_spec.num_layers, self.model_spec.num_experts, cache)
        cache.begin_sequence()
        self.hits = self.misses = self.decisions = self._pending_misses = 0
        self._episode = self._run(sequence, cache)
        self._decision = next(self._episode, None)
        if self._decision is None:
            self._no_decisions.add((index, capacity))
        return self._decision is not None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        count = len(self.trace.sequences)
        if "capacity" in options and int(options["capacity"]) not in self.capacities:
            raise UsageError(f"capacity {options['capacity']} is not one of the env's {self.capacities}")
        if "sequence" in options:
            index = int(options["sequence"])
            if not 0 <= index < count:
                raise UsageError(f"sequence {index} outside 0..{count - 1}")
            capacity = int(options.get("capacity", self.capacities[0]))
            if not self._start(index, capacity):
                raise UsageError(f"sequence {index} makes no eviction decision at {capacity} slots per layer")
        else:
            pairs = [(i, c) for i in range(count) for c in self.capacities]
            while True:
                open_pairs = [p for p in pairs if p not in self._no_decisions]
                if not open_pairs:
                    raise UsageError(
                        f"no sequence of the trace makes an eviction decision at {self.capacities} slots per layer: "
                        "give smaller capacities"
                    )
                capacity = int(options.get("capacity", open_pairs[self.np_random.integers(len(open_pairs))][1]))
                index = int(self.np_random.integers(count))
                if (index, capacity) not in self._no_decisions and self._start(index, capacity):
                    break
        self._pending_misses = 0
        return self._observation(), self._info()

    def step(self, action):
        decision = self._decision
        if decision is None:
            raise gym.error.ResetNeeded("the episode has ended: call reset() before step()")
        index = checked_index(action, self.max_candidates) % len(decision.candidates)
        reward = 0.0
        if self.reward_kind in ("belady", "regret"):
            reward = self._belady_reward(decision, index)
        self.decisions += 1
        self._pending_misses = 0
        try:
            self._decision = self._episode.send(index)
        except StopIteration:  # the rest of the sequence is routed: no decision is left
            self._decision = None
        terminated = self._decision is None
        if self.reward_kind == "misses":
            reward = -float(self._pending_misses)
        info = self._info()
        if terminated:
            self._cache(self.capacity).finish()
            if self.reference_metrics:
                info["gap_captured"] = self.gap_captured(info["hit_rate"])
            obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        else:
            obs = self._observation()
        return obs, reward, terminated, False, info

    # -- pieces ------------------------------------------------------------------------------------------------
    def _belady_reward(self, decision: Decision, index: int) -> float:
        """The choice against Belady's victim (the candidate used farthest in the future), ``reward_kind``'s way."""
        cache = self._cache(self.capacity)
        distance = np.array([cache.next_use(decision.layer, e) for e in decision.candidates], dtype=np.float64)
        capped = np.minimum(distance, self.horizon)
        if self.reward_kind == "regret":
            return -1.0 if capped[index] < capped.max() else 0.0
        return float((math.log1p(capped[index]) - math.log1p(capped.max())) / math.log1p(self.horizon))

    def _observation(self) -> np.ndarray:
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        decision = self._decision
        if decision is not None:
            n = len(decision.candidates)
            obs[:n, :NUM_FEATURES] = decision.rows
            obs[:n, MASK_COLUMN] = 1.0
        return obs

    def _info(self) -> dict:
        total = self.hits + self.misses
        return {
            "hit_rate": self.hits / total if total else 0.0,
            "hits": self.hits,
            "misses": self.misses,
            "decisions": self.decisions,
            "capacity": self.capacity,
        }

    @property
    def current_decision(self) -> Decision | None:
        """The pending decision (layer, candidates, rows): what the observation describes."""
        return self._decision

    def gap_captured(self, hit_rate: float) -> float:
        lru, belady = self.reference_hit_rates(self.sequence_index, self.capacity)
        return (hit_rate - lru) / (belady - lru) if belady > lru else float("nan")

    def reference_hit_rates(self, index: int, capacity: int) -> tuple[float, float]:
        """Decode hit rates of LRU and Belady on one sequence at one capacity, computed once."""
        if (index, capacity) not in self._references:
            one = Trace(self.trace.meta, [self.trace.sequences[index]])
            lru, belady = (simulate(one, name, capacity).hit_rate for name in ("lru", "belady"))
            self._references[(index, capacity)] = (lru, belady)
        return self._references[(index, capacity)]


def _resolve_tables(tables: ModelTables | str | None, spec) -> ModelTables | None:
    from moe_env.agents.model_tables import find_shipped_tables, load_tables

    if isinstance(tables, str):
        return find_shipped_tables(spec) if tables == "shipped" else load_tables(tables, spec)
    return tables


def checked_index(action, size: int) -> int:
    """The action as a candidate index; anything but one integer in 0..size-1 raises InvalidArgument."""
    array = np.asarray(action)
    if array.dtype.kind not in "iu" or array.size != 1:
        raise InvalidArgument(f"action must be one integer candidate index, got {action!r}")
    index = int(array.reshape(-1)[0])
    if not 0 <= index < size:
        raise InvalidArgument(f"action {index} outside 0..{size - 1} (the env's max_candidates)")
    return index
