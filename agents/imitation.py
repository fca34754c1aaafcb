"""Imitation of Belady (Parrot-style): an eviction scorer trained on the optimum's decisions, and its plug-in.

At each eviction the cache asks the policy for one score per candidate; ``ImitationPolicy`` builds every
candidate's feature row (agents/candidate_features.py) and scores them all in one numpy call with a set scorer
(agents/set_scorer.py) whose weights are shared across experts, layers and models: one checkpoint runs on any
(layers, experts, top-k) and any budget. It never reads the future (``needs_future`` is False).

Training (``dagger``): replay the training traces through ``DecisionCollector``, a policy that records at every
eviction the candidates' rows and Belady's label (the candidates with the farthest next use, from the replay's
oracle) and then evicts as its *behaviour* says: round 0 follows Belady (the states the optimum visits), later
rounds follow the learner trained so far (the states its own choices reach; DAgger), with the oracle taking a
share ``beta`` of those decisions. Every round adds its decisions to the pool; the scorer is refit on the pool
with a listwise loss (agents/set_scorer.py). The round whose scorer has the best validation hit rate is kept.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moe_env.agents.candidate_features import (
    FEATURES,
    HIDEABLE,
    NUM_FEATURES,
    CandidateFeatures,
    ModelTables,
    event_token,
)
from moe_env.agents.checkpoint import (
    PER_LAYER,
    SHARED,
    PolicyCheckpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    trained_decisions,
)
from moe_env.agents.configs import config_from_dict
from moe_env.agents.cross_layer_scores import CrossLayerScores
from moe_env.agents.model_tables import find_shipped_tables, load_tables
from moe_env.agents.set_scorer import Decisions, NumpyScorer, SetScorerNet, fit_scorer, widen_scorer

from moe_env.allocation import Allocation
from moe_env.errors import CheckpointError, UsageError
from moe_env.policy import CacheView, ModelSpec, Policy, RouteEvent
from moe_env.sim import Replayer, cost_model_for
from moe_env.trace import Trace

KIND = "imitation"
BEHAVIOURS = ("belady", "lru", "learner")
ALLOCATIONS = ("uniform", "shared", "both")


def shipped_imitation_path() -> Path:
    import moe_env

    return Path(moe_env.__file__).resolve().parent / "assets" / "policies" / "imitation.pt"


@dataclass
class ImitationConfig:
    """train/configs/imitation.json holds these fields; every default is derived from the trace when None."""

    hidden: int = 32
    rounds: int = 3  # round 0 on the states of `first_behaviour`, then DAgger rounds on the learner's
    first_behaviour: str = "lru"  # lru | belady (Belady's states alone mislead: measured, see README)
    soft_weight: float = 1.0  # weight of the softened Belady order (every candidate ranked by next use)
    temperature: float = 0.5
    horizon_tokens: float = 64.0  # next-use distances are capped at this many tokens
    regret_weight: bool = False  # weight each decision by what a wrong choice costs (set_scorer.regret_weights)
    beta: float = 0.3  # share of a DAgger round's decisions taken by the oracle
    # the oracle's share per DAgger round (round 1, 2, ...; the last entry for later rounds), Parrot's decaying
    # mix of the oracle's and the learner's states, e.g. [0.5, 0.25, 0.0]; None: `beta` every round
    beta_schedule: list[float] | None = None
    # the model widths (num_experts) whose traces the DAgger rounds replay; the others keep their round-0 decisions
    # only (a model with one short training sequence is hurt by its learner states: README); None: every trace
    learner_experts: list[int] | None = None
    epochs: int = 8
    lr: float = 3e-3
    batch_size: int = 512
    max_decisions_per_round: int = 60_000  # decisions are subsampled to this many per round
    capacities: list[int] | None = None  # None: a quarter, half and three quarters of the experts (>= top-k + 1)
    max_sequences: int | None = None  # None: every training sequence
    # each round draws its own max_sequences (more prompts seen); False: every round replays round 0's draw, so a
    # DAgger round differs from round 0 in the behaviour only (a fresh draw can be dominated by one long prompt)
    resample_sequences: bool = True
    use_tables: bool = True  # warm-start the online statistics from the training split's tables
    # per training sequence, each signal it has (tokens, gate weights/logits, lookahead) is hidden with this
    # probability, "missing" indicators set: one checkpoint then scores traces with and without them
    signal_dropout: float = 0.0
    # a training trace with fewer sequences gets no model tables: tables of a sequence replayed on itself would
    # tell the scorer that sequence's future, which no deployment has
    tables_min_sequences: int = 1
    no_tables_share: float = 0.0  # share of a round's sequences replayed without model tables (a model never seen)
    # per model width (num_experts as a string): its training budgets, before `capacities`
    capacities_by_experts: dict[str, list[int]] | None = None
    # feature columns held at zero in training, so the scorer ignores them (constant columns are ignored): an
    # ablation that keeps the checkpoint's rows those of this moe-env
    ignored_features: list[str] = field(default_factory=list)
    # which decisions are collected: "uniform" (one layer's candidates per eviction), "shared" (one pool of every
    # layer: all layers' candidates per eviction, agents/shared_imitation.py) or "both"; a checkpoint trained on
    # shared decisions ranks across layers (its "decisions" field)
    allocation: str = "uniform"
    # total slots of the shared pool; None: num_layers x each per-layer budget (capacities_for)
    shared_budgets: list[int] | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImitationConfig:
        foreign = sorted(set(values.get("ignored_features", [])) - set(FEATURES))
        if foreign:
            raise UsageError(f"ignored_features names unknown columns {foreign}: the columns are {', '.join(FEATURES)}")
        return config_from_dict(cls, values, "imitation config")

    def __post_init__(self) -> None:  # every way of building a config (file, dict, code) checks it
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"imitation config: allocation {self.allocation!r}, expected one of {ALLOCATIONS}")
        if self.beta_schedule is not None and (not self.beta_schedule or
                                               any(not 0.0 <= b <= 1.0 for b in self.beta_schedule)):  # fmt: skip
            raise UsageError(f"imitation config: beta_schedule {self.beta_schedule}: give oracle shares in [0, 1], "
                             "one per DAgger round")  # fmt: skip

    def beta_of(self, round_index: int) -> float:
        """The oracle's share of DAgger round `round_index`: its beta_schedule entry (round 1 the first, the last
        entry for every later round; a round 0 on the learner's states takes the first), else `beta`."""
        if not self.beta_schedule:
            return self.beta
        return self.beta_schedule[min(max(round_index, 1), len(self.beta_schedule)) - 1]

    def replays_learner(self, trace: Trace) -> bool:
        """Whether the DAgger rounds (after round 0) collect decisions on `trace` (learner_experts)."""
        return self.learner_experts is None or trace.meta.num_experts in self.learner_experts

    @property
    def decisions(self) -> list[str]:
        """The decision kinds (agents/checkpoint.py DECISION_KINDS) this config trains on."""
        return {"uniform": [PER_LAYER], "shared": [SHARED], "both": [PER_LAYER, SHARED]}[self.allocation]


def default_capacities(num_experts: int, top_k: int) -> list[int]:
    """Budgets a model is trained at: about 1/8, 1/4 and 1/2 of the experts (at least top-k + 1)."""
    picks = {max(top_k + 1, min(num_experts - 1, round(num_experts * f))) for f in (0.125, 0.25, 0.5)}
    return sorted(c for c in picks if top_k < c < num_experts) or [min(num_experts, top_k + 1)]


# ----------------------------------------------------------------------------------------------- the plug-in


class CandidateFeaturePolicy(Policy):
    """A policy that keeps CandidateFeatures up to date; `tables`: ModelTables, None, or "shipped" (by shape), or
    a tables path. Online statistics are kept across the sequences of one run (a server learns while it serves)."""

    tables: ModelTables | str | None = None
    features: CandidateFeatures | None = None
    columns: list[str] | None = None  # the feature columns the scorer reads (None: all)

    def _tables(self, spec: ModelSpec) -> ModelTables | None:
        if isinstance(self.tables, str):
            return find_shipped_tables(spec) if self.tables == "shipped" else load_tables(self.tables, spec)
        return self.tables

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        """The cache is empty; the online statistics of the deployment survive unless the model changed."""
        super().reset(spec, capacity)
        if self.features is None or self.features.spec != spec or self.features.capacity != capacity:
            self.features = CandidateFeatures(spec, capacity, self._tables(spec), self.columns)

    hide_share: float = 0.0  # signal dropout: each hideable signal is hidden in a sequence with this probability
    hide_rng: np.random.Generator | None = None

    # a shared pool asks every layer at each eviction: every resident scored at once, rows kept per layer
    _across: CrossLayerScores | None = None

    def begin_sequence(self, cache: CacheView) -> None:
        hidden = ()
        if self.hide_share > 0 and self.hide_rng is not None:
            hidden = [name for name in HIDEABLE if self.hide_rng.random() < self.hide_share]
        self.features.begin_sequence(hidden)
        if self._across is not None:
            self._across.begin(self.features)

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        self.features.update(event, cache.clock)
        if self._across is not None:
            self._across.observe(event.layer)


class ScorerEviction(CandidateFeaturePolicy):
    """Evicts the candidate with the lowest set-scorer score. `across_layers`: the scorer was trained on shared-pool
    decisions (its scores compare across layers), so the policy may serve one pool of every layer."""

    def __init__(self, scorer: NumpyScorer, tables: ModelTables | str | None = "shipped", across_layers: bool = False):
        self.scorer = scorer
        self.tables = tables
        self.features = None
        self.ranks_across_layers = across_layers
        self._scored: np.ndarray | None = None
        self._scores = np.zeros(0)
        self._across = CrossLayerScores(scorer) if across_layers else None

    def compiled_router(self):
        """moe_env.sim's fast path: agents/scored_replay.py routes a sequence's events for this plug-in in
        compiled code (None when a subclass changed one of its hooks)."""
        from moe_env.agents.scored_replay import replays_compiled, route_sequence

        return route_sequence if replays_compiled(self) else None

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        if self._across is not None:
            return self._across.scores(layer, candidates, cache)
        if len(candidates) == 1:
            return np.zeros(1)
        rows = self.features.layer_rows(layer, cache)
        if self._scored is not rows:  # one scorer call per event and layer: its evictions share the scores
            self._scored, self._scores = rows, self.scorer(rows)
        return self._scores[candidates]


class CheckpointScorerEviction(ScorerEviction):
    """A ScorerEviction whose set scorer comes from a checkpoint of `kind` (imitation, ppo): the features must be
    this moe-env's, and a signal the checkpoint needs is checked on each sequence's first decode event."""

    def __init__(self, path: Path, kind: str, tables: str | None = None):
        self.path = path
        self.ckpt = load_checkpoint(self.path, kind)
        choice: str | None = "shipped" if tables is None else tables
        super().__init__(NumpyScorer(load_scorer_net(self.ckpt, str(self.path))),
                         None if str(choice).lower() == "none" else choice,
                         SHARED in trained_decisions(self.ckpt, str(self.path)))  # fmt: skip
        self.columns = [str(name) for name in self.ckpt.config.get("features", [])]  # checked by load_scorer_net
        self.needs = [str(n) for n in self.ckpt.config.get("needs", [])]
        unknown = sorted(set(self.needs) - set(SIGNALS))
        if unknown:
            raise CheckpointError(f"{self.path}: needs unknown signals {unknown} (known: {', '.join(SIGNALS)})")
        self._checked = False

    def begin_sequence(self, cache: CacheView) -> None:
        super().begin_sequence(cache)
        self._checked = not self.needs

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        if not self._checked and not event.prefill:
            self.check_signals(event)
            self._checked = True
        super().observe(event, cache)

    def check_signals(self, event: RouteEvent) -> None:
        """Refuse a decode event that lacks a signal the checkpoint needs."""
        for name in self.needs:
            if not SIGNALS[name](event):
                raise CheckpointError(
                    f"{self.path}: this policy needs the {name} (trained only where they exist), which this "
                    f"trace lacks; train it on traces without them or use another policy"
                )


def load_scorer_net(ckpt: PolicyCheckpoint, where: str) -> SetScorerNet:
    """The set scorer of an imitation or shape-agnostic ppo checkpoint, refused if its features are not ours."""
    saved = [str(name) for name in ckpt.config.get("features", [])]
    if not saved or not set(saved) <= set(FEATURES) or len(set(saved)) != len(saved):
        raise CheckpointError(f"{where}: trained on features {saved}, this moe-env computes {list(FEATURES)}")
    net = SetScorerNet(len(saved), int(ckpt.config.get("hidden", 32)))
    load_weights(net, ckpt, where)
    if saved != list(FEATURES):  # trained before some columns were added: the same scorer on our wider rows
        net = widen_scorer(net, [FEATURES.index(name) for name in saved], NUM_FEATURES)
    return net.eval()


class ImitationPolicy(CheckpointScorerEviction):
    """``--policy imitation[:PATH][,tables=PATH|none]``: the learned eviction scorer; no PATH: the shipped one.

    Model tables (a training split's statistics) are the shipped ones of the model's shape unless ``tables`` is
    given (``none``: start the online statistics empty)."""

    def __init__(self, path: str | os.PathLike | None = None, tables: str | None = None):
        super().__init__(Path(path) if path else shipped_imitation_path(), KIND, tables)


# signal -> is it present on a decode event; a checkpoint "needs" a signal that was never missing in training
SIGNALS: dict[str, Callable[[RouteEvent], bool]] = {
    "gate weights": lambda event: event.weights is not None,
    "gate logits": lambda event: event.gate_logits is not None,
    "tokens": lambda event: event_token(event) is not None,
}
_MISSING_COLUMN = {"gate weights": "weight_missing", "gate logits": "gate_missing", "tokens": "token_missing"}


def needed_signals(pool: Decisions) -> list[str]:
    """Signals whose "missing" indicator never fired in the training decisions: the scorer never learned
    to do without them, so a trace lacking them is refused rather than scored out of distribution."""
    if not pool.size:
        return []
    return [name for name, column in _MISSING_COLUMN.items() if pool.rows[:, FEATURES.index(column)].max() == 0]


# -------------------------------------------------------------------------------------------------- training


class DecisionCollector(CandidateFeaturePolicy):
    """Records (candidate rows, Belady's label) at every eviction and evicts as ``behaviour`` says."""

    needs_future = True

    def __init__(self, behaviour: str, scorer: NumpyScorer | None = None, beta: float = 0.0,
                 keep: float = 1.0, tables: ModelTables | None = None, seed: int = 0,
                 signal_dropout: float = 0.0):  # fmt: skip
        if behaviour not in BEHAVIOURS or (behaviour == "learner" and scorer is None):
            raise ValueError(f"behaviour {behaviour!r}: expected one of {BEHAVIOURS} (learner needs a scorer)")
        self.behaviour, self.scorer, self.beta, self.keep = behaviour, scorer, beta, keep
        self.tables = tables
        self.rng = np.random.default_rng(seed)
        self.hide_share, self.hide_rng = signal_dropout, np.random.default_rng(seed + 1)
        self.features = None
        self.rows: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.distances: list[np.ndarray] = []
        self.agree = self.decisions = 0

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        if len(candidates) == 1:
            return np.zeros(1)
        record = self.rng.random() < self.keep
        # the oracle's distances only where they are used: most decisions are not recorded (subsampled)
        next_use = None
        if record or self.behaviour != "lru":
            next_use = np.array([cache.next_use(layer, int(e)) for e in candidates])
        rows = self.features.rows(layer, candidates, cache) if record or self.behaviour == "learner" else None
        if record:
            self.rows.append(rows.astype(np.float32))
            self.targets.append(belady_labels(next_use))
            self.distances.append(next_use.astype(np.float32))
        if self.behaviour == "belady":
            return -next_use
        if self.behaviour == "lru":
            return cache.last_use(layer)[candidates].astype(np.float64)
        scores = self.scorer(rows)
        self.decisions += 1
        self.agree += bool(belady_labels(next_use)[int(np.argmin(scores))])
        if self.rng.random() < self.beta:
            return -next_use
        return scores

    def decisions_recorded(self) -> Decisions:
        if not self.rows:
            return Decisions.concat([])
        lengths = np.array([len(r) for r in self.rows])
        return Decisions(
            np.concatenate(self.rows),
            np.concatenate(self.targets),
            np.concatenate([[0], np.cumsum(lengths)]),
            np.concatenate(self.distances),
        )


def belady_labels(next_use: np.ndarray) -> np.ndarray:
    """Belady's choice among candidates: every candidate whose next use is the farthest (never again = inf)."""
    return next_use == next_use.max()


def replay(trace: Trace, policy: Policy, capacity: int | Allocation, profile: str | None = None):
    """Demand-only replay of every sequence through `policy` (the cache's one decision point); the SimResult."""
    replayer = Replayer(trace.meta, policy, capacity, cost_model_for(trace.meta, profile))
    for sequence in trace.sequences:
        replayer.begin_sequence(sequence)
        for routing in sequence.routings():
            replayer.process(routing)
    return replayer.finish()


def estimate_evictions(trace: Trace, capacity: float) -> int:
    """About how many evictions one replay makes (half the accesses miss at small budgets): to subsample."""
    miss = max(0.05, 1.0 - capacity / trace.meta.num_experts)
    return max(1, int(trace.num_accesses * miss))


def collect(trace: Trace, capacities: list[int], behaviour: str, scorer: NumpyScorer | None, beta: float,
            budget: int, tables: ModelTables | None, seed: int, signal_dropout: float = 0.0,
            no_tables_share: float = 0.0, shared: bool = False) -> tuple[Decisions, float]:  # fmt: skip
    """Decisions of one round over every capacity; and the learner's agreement with Belady (nan if not learner).
    A share `no_tables_share` of the sequences is replayed without `tables` (online statistics from empty).
    `shared`: each capacity is the total of one pool of every layer (agents/shared_imitation.py decisions)."""
    from moe_env.agents.shared_imitation import SharedDecisionCollector  # it builds on this module

    meta = trace.meta
    make = SharedDecisionCollector if shared else DecisionCollector
    parts = []
    agree = total = 0
    per_capacity = max(1, budget // len(capacities))
    splits = [(trace, tables)]
    if tables is not None and no_tables_share > 0 and len(trace.sequences) > 1:
        order = np.random.default_rng(seed).permutation(len(trace.sequences))
        plain = min(len(order) - 1, max(1, round(no_tables_share * len(order))))
        splits = [(_sequences(trace, order[:plain]), None), (_sequences(trace, order[plain:]), tables)]
    for i, capacity in enumerate(capacities):
        keep = min(1.0, per_capacity / estimate_evictions(trace, capacity / meta.num_layers if shared else capacity))
        layout = Allocation.one_pool(meta.num_layers, meta.num_experts, capacity) if shared else capacity
        for j, (part, part_tables) in enumerate(splits):
            collector = make(behaviour, scorer, beta, keep, part_tables, seed=seed * 1000 + 10 * i + j,
                             signal_dropout=signal_dropout)  # fmt: skip
            replay(part, collector, layout)
            parts.append(collector.decisions_recorded())
            agree += collector.agree
            total += collector.decisions
    return Decisions.concat(parts), (agree / total if total else math.nan)


def _sequences(trace: Trace, indices: np.ndarray) -> Trace:
    return Trace(trace.meta, [trace.sequences[j] for j in sorted(indices.tolist())])


@dataclass
class RoundResult:
    round: int
    behaviour: str
    decisions: int
    pool: int
    learner_agreement: float  # on the states of this round's behaviour (DAgger rounds only)
    validation_hit_rate: dict[int, float] = field(default_factory=dict)
    validation_gap: dict[int, float] = field(default_factory=dict)


def save_imitation(net: SetScorerNet, config: ImitationConfig, trained_on: list[str], path: str | os.PathLike,
                   extra: dict[str, Any] | None = None) -> Path:  # fmt: skip
    described = asdict(config) | {"features": list(FEATURES), "trained_on": trained_on,
                                  "decisions": config.decisions} | (extra or {})  # fmt: skip
    model = {"name": "", "num_layers": 0, "num_experts": 0, "top_k": 0}  # shape-agnostic
    return save_checkpoint(PolicyCheckpoint(KIND, model, 0, NUM_FEATURES, described, net.state_dict()), path)


def dagger(
    traces: list[tuple[Trace, ModelTables | None]],
    validation: list[tuple[Trace, ModelTables | None]],
    config: ImitationConfig,
    evaluate: Callable[[SetScorerNet, int], list[RoundResult] | RoundResult],
    log: Callable[[str], None] = print,
    start_round: int = 0,
    pool: Decisions | None = None,
    net: SetScorerNet | None = None,
    on_round: Callable[[int, SetScorerNet, Decisions, RoundResult], None] | None = None,
) -> SetScorerNet:
    """DAgger rounds over the (trace, tables) pairs; `evaluate(net, round)` scores a round's scorer on validation."""
    pool = pool if pool is not None else Decisions.concat([])
    for round_index in range(start_round, config.rounds):
        behaviour = config.first_behaviour if round_index == 0 or net is None else "learner"
        scorer = NumpyScorer(net) if behaviour == "learner" else None
        beta = config.beta_of(round_index) if behaviour == "learner" else 0.0
        parts = []
        agreements = []
        replayed = [(i, pair) for i, pair in enumerate(traces) if round_index == 0 or config.replays_learner(pair[0])]
        if not replayed:
            widths = sorted({t.meta.num_experts for t, _ in traces})
            raise UsageError(f"imitation config: learner_experts {config.learner_experts} names no training trace's "
                             f"width (they have {widths} experts); list one of them or drop the field")  # fmt: skip
        for i, (trace, tables) in replayed:
            trace = round_sequences(trace, config, round_index, i)
            kinds = config.decisions
            budget = config.max_decisions_per_round // (len(replayed) * len(kinds))
            seed = config.seed + 7919 * round_index + i
            used = tables if config.use_tables else None
            for kind in kinds:
                shared = kind == SHARED
                capacities = shared_budgets_for(trace, config) if shared else capacities_for(trace, config)
                part, agree = collect(trace, capacities, behaviour, scorer, beta, budget, used, seed,
                                      config.signal_dropout, config.no_tables_share, shared)  # fmt: skip
                parts.append(part)
                agreements.append(agree)
        fresh = Decisions.concat(parts)
        pool = Decisions.concat([pool, fresh])
        mix = f", oracle share {beta:g}" if behaviour == "learner" else ""
        log(f"round {round_index} ({behaviour} states{mix}): {fresh.size} new decisions, pool {pool.size}")

        def progress(epoch: int, loss: float, r=round_index) -> None:
            log(f"round {r} epoch {epoch + 1}/{config.epochs}: listwise loss {loss:.4f}")

        horizon = config.horizon_tokens * traces[0][0].meta.num_layers * traces[0][0].meta.top_k  # in accesses
        net = fit_scorer(without_columns(pool, config.ignored_features), config.hidden, config.epochs, config.lr,
                         config.batch_size, config.seed + round_index,
                         progress=progress, soft_weight=config.soft_weight, horizon=horizon,
                         temperature=config.temperature, regret_weight=config.regret_weight)  # fmt: skip
        result = evaluate(net, round_index)
        assert isinstance(result, RoundResult)
        result.behaviour, result.decisions, result.pool = behaviour, fresh.size, pool.size
        valid = [a for a in agreements if not math.isnan(a)]
        result.learner_agreement = float(np.mean(valid)) if valid else math.nan
        if on_round is not None:
            on_round(round_index, net, pool, result)
    assert net is not None
    return net


def without_columns(pool: Decisions, names: list[str]) -> Decisions:
    """`pool` with the named feature columns zeroed (a copy; the pool itself is unchanged)."""
    if not names:
        return pool
    rows = pool.rows.copy()
    rows[:, [FEATURES.index(name) for name in names]] = 0.0
    return Decisions(rows, pool.target, pool.offsets, pool.distance)


def round_sequences(trace: Trace, config: ImitationConfig, round_index: int, trace_index: int) -> Trace:
    """The training sequences of `trace` (the `trace_index`-th) that round `round_index` replays."""
    drawn = round_index if config.resample_sequences else 0
    return subsample(trace, config.max_sequences, config.seed + 31 * drawn + trace_index)


def subsample(trace: Trace, max_sequences: int | None, seed: int) -> Trace:
    """At most `max_sequences` sequences of `trace`, drawn without replacement (a different draw each round)."""
    if not max_sequences or len(trace.sequences) <= max_sequences:
        return trace
    chosen = np.sort(np.random.default_rng(seed).choice(len(trace.sequences), max_sequences, replace=False))
    return Trace(trace.meta, [trace.sequences[i] for i in chosen])


def torch_threads(n: int = 1) -> None:
    torch.set_num_threads(n)


def capacities_for(trace: Trace, config: ImitationConfig) -> list[int]:
    """The budgets `trace` is trained and validated at: its width's entry of capacities_by_experts, else
    `capacities`, else the defaults; only those between top-k and the number of experts."""
    meta = trace.meta
    by_width = (config.capacities_by_experts or {}).get(str(meta.num_experts))
    chosen = by_width or config.capacities or default_capacities(meta.num_experts, meta.top_k)
    return [c for c in chosen if meta.top_k < c < meta.num_experts] or [min(meta.top_k + 1, meta.num_experts)]


def shared_budgets_for(trace: Trace, config: ImitationConfig) -> list[int]:
    """Total slots of the shared pool `trace` is trained and validated at: `shared_budgets`, else num_layers x each
    per-layer budget; only those that hold one token's experts and leave something to evict."""
    meta = trace.meta
    chosen = config.shared_budgets or [meta.num_layers * c for c in capacities_for(trace, config)]
    return [t for t in chosen if meta.top_k <= t < meta.num_layers * meta.num_experts]


References = dict[tuple[str, int | str], tuple[float, float]]  # (label, capacity) -> (LRU hit rate, Belady hit rate)


def gap_report(net: SetScorerNet, traces: list[tuple[str, Trace, ModelTables | None]], config: ImitationConfig,
               references: References | None = None) -> dict[str, dict[int | str, dict]]:  # fmt: skip
    """Per trace label and capacity: the scorer's hit rate, LRU's, Belady's and the share of the gap captured.
    Trained on shared decisions: also each shared budget, keyed "shared-<total>" (LRU and Belady in that pool)."""
    from moe_env.sim import simulate

    references = {} if references is None else references
    scorer = NumpyScorer(net)
    across = SHARED in config.decisions
    out: dict[str, dict[int | str, dict]] = {}
    for label, trace, tables in traces:
        out[label] = {}
        meta = trace.meta
        layouts: list[tuple[int | str, int | Allocation]] = []
        if PER_LAYER in config.decisions:
            layouts += [(c, c) for c in capacities_for(trace, config)]
        if across:
            layouts += [(f"shared-{t}", Allocation.one_pool(meta.num_layers, meta.num_experts, t))
                        for t in shared_budgets_for(trace, config)]  # fmt: skip
        for key, layout in layouts:
            if (label, key) not in references:
                references[(label, key)] = (
                    simulate(trace, "lru", layout).hit_rate,
                    simulate(trace, "belady", layout).hit_rate,
                )
            lru, belady = references[(label, key)]
            policy = ScorerEviction(scorer, tables if config.use_tables else None, across_layers=across)
            hit = replay(trace, policy, layout).hit_rate
            gap = (hit - lru) / (belady - lru) if belady > lru else math.nan
            out[label][key] = {"hit_rate": hit, "lru": lru, "belady": belady, "gap_captured": gap}
    return out


def mean_gap(report: dict[str, dict[int | str, dict]]) -> float:
    gaps = [v["gap_captured"] for per in report.values() for v in per.values() if not math.isnan(v["gap_captured"])]
    return float(np.mean(gaps)) if gaps else math.nan
