"""The Policy protocol: the one interface that the engine, the simulator and the env consult.

A policy is a *scorer*. The cache (moe_env.cache.ExpertCacheState.route) is the only caller:

- ``bind_cost_model(cost)`` once, by drivers that have a time model (simulator, env replays; not the live engine);
- ``reset(spec, capacity)`` whenever the cache starts empty: its PERSISTENT state (every sequence when cold,
  once per request stream when warm); ``capacity`` is the most slots any one layer can hold;
- ``begin_sequence(cache)`` at the start of every sequence, warm or cold, after any reset: PER-SEQUENCE state;
- ``observe(event, cache)`` once per routed layer, before that layer's experts are acquired;
- ``eviction_scores(layer, candidates, cache)`` when a slot must be freed: one score per candidate, the LOWEST
  is evicted; ties go to the least recently used, then to the lowest expert id. Candidates never include an
  expert that the current layer needs or one still in flight, so a policy cannot break the cache's invariants.
  In a shared pool (allocation ``shared``) the cache compares scores of different layers' candidates: only a
  policy that declares ``ranks_across_layers = True`` may run there;
- ``prefetch(event, cache)`` after the layer's experts are acquired: ``(layer, expert)`` pairs in priority order.

Policies are found by name through the entry-point group ``moe_env.policies``; a spec is ``name`` or
``name:arg`` where arg is ``k=v[,k=v...]`` (keyword arguments) or a bare value (the first positional argument,
e.g. a checkpoint path: ``ppo:runs/x/policy.zip``).
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moe_env.errors import MoeEnvError

ENTRY_POINT_GROUP = "moe_env.policies"


class PolicyError(MoeEnvError):
    """A policy returned something the cache cannot act on (wrong length, NaN, out-of-range expert)."""


class PolicySpecError(MoeEnvError):
    """A policy spec string names no known policy or cannot be parsed."""


@dataclass(frozen=True)
class ModelSpec:
    """What a policy may know about the model: shape of the routing problem and the size of one expert."""

    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int = 0
    name: str = ""


@dataclass(frozen=True, eq=False)
class RouteEvent:
    """One routing decision of one MoE layer for one decode step (or one prefill chunk).

    ``experts`` are accessed in the given order. ``gate_logits`` and ``lookahead_logits`` have shape
    [num_experts]; ``lookahead_logits`` is the NEXT MoE layer's gate applied to this layer's input (the
    speculative signal for prefetch); either may be None when the source lacks it (e.g. converted logs, the
    last layer). For a prefill chunk ``step`` is -1 and the logits are those of the last prompt token.
    """

    step: int
    layer: int
    experts: tuple[int, ...]
    weights: np.ndarray | None = None
    gate_logits: np.ndarray | None = None
    lookahead_logits: np.ndarray | None = None
    prefill: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    bypass: bool = False  # a prefill group computed from copies that are not installed (prefill mode bypass)


class OracleUnavailable(MoeEnvError):
    """Raised by CacheView.next_use/future outside replay (the live engine cannot see the future)."""


@runtime_checkable
class CacheView(Protocol):
    """Read-only view of the expert cache, the same in engine, simulator and env."""

    spec: ModelSpec
    capacity: int

    @property
    def clock(self) -> int:
        """Number of expert accesses since the cache was last empty (the recency clock; warm: across requests)."""

    def layer_capacity(self, layer: int) -> int:
        """The most experts of `layer` that can be resident at once (its pool's slots, at most all experts)."""

    def resident(self, layer: int) -> list[int]:
        """Experts of `layer` that occupy a slot (in flight included)."""

    def is_resident(self, layer: int, expert: int) -> bool: ...

    def in_flight(self, layer: int) -> list[int]:
        """Experts of `layer` whose prefetch was issued and not yet consumed by that layer's acquire."""

    def last_use(self, layer: int) -> np.ndarray:
        """[num_experts] clock of each expert's last access since the cache was empty, -1 if never."""

    def use_count(self, layer: int) -> np.ndarray:
        """[num_experts] accesses since the cache was empty, counted also while the expert is not resident."""

    def loaded_at(self, layer: int) -> np.ndarray:
        """[num_experts] clock at which each resident expert was loaded, -1 if not resident."""

    def next_use(self, layer: int, expert: int) -> float:
        """Accesses until `expert` of `layer` is used next (inf if never). Replay only: else OracleUnavailable."""

    def future_experts(self, step: int, layer: int) -> tuple[int, ...] | None:
        """Experts that (step, layer) will route to, or None past the end. Replay only: else OracleUnavailable."""


class Policy:
    """Base class of every cache/prefetch policy. Defaults: LRU eviction, no prefetch, no state."""

    #: True for policies that read the future (cache.next_use); the live engine refuses them.
    needs_future: bool = False
    #: True for policies that only prefetch; --policy rejects them, --prefetch expects them.
    prefetch_only: bool = False
    #: True when eviction scores of different layers are comparable (one clock or one scale for all layers), so
    #: the policy can pick a victim in a pool shared by every layer.
    ranks_across_layers: bool = False
    #: True when ``reset`` clears all state that decisions depend on, so the sequences of a cold replay run apart
    #: and merge exactly (moe_env.sweep shards such runs by sequence). Default False: always safe.
    independent_sequences: bool = False
    name: str = "policy"

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        """Clear the persistent state: the cache is empty."""
        self.spec = spec
        self.capacity = capacity

    def begin_sequence(self, cache: CacheView) -> None:
        """A new sequence starts (the cache may be warm from earlier ones): clear the per-sequence state."""
        return None

    def bind_cost_model(self, cost: Any) -> None:
        """Told the driver's cost model (a ``moe_env.costmodel.CostModel``) before ``reset`` by drivers that have
        one (the simulator, the env's replays); the live engine has none and never calls it. Default: ignored."""
        return None

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        return None

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        return cache.last_use(layer)[candidates].astype(np.float64)

    def prefetch(self, event: RouteEvent, cache: CacheView) -> Sequence[tuple[int, int]]:
        return ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class CombinedPolicy(Policy):
    """Eviction from one policy, prefetch from another (``--policy lru --prefetch lookahead``)."""

    def __init__(self, evict: Policy, prefetcher: Policy):
        self.evict = evict
        self.prefetcher = prefetcher
        self.name = f"{evict.name}+{prefetcher.name}"
        self.needs_future = evict.needs_future or prefetcher.needs_future
        self.ranks_across_layers = evict.ranks_across_layers
        self.independent_sequences = evict.independent_sequences and prefetcher.independent_sequences

    def reset(self, spec: ModelSpec, capacity: int) -> None:
        super().reset(spec, capacity)
        self.evict.reset(spec, capacity)
        self.prefetcher.reset(spec, capacity)

    def begin_sequence(self, cache: CacheView) -> None:
        self.evict.begin_sequence(cache)
        self.prefetcher.begin_sequence(cache)

    def bind_cost_model(self, cost: Any) -> None:
        self.evict.bind_cost_model(cost)
        self.prefetcher.bind_cost_model(cost)

    def observe(self, event: RouteEvent, cache: CacheView) -> None:
        self.evict.observe(event, cache)
        self.prefetcher.observe(event, cache)

    def eviction_scores(self, layer: int, candidates: np.ndarray, cache: CacheView) -> np.ndarray:
        return self.evict.eviction_scores(layer, candidates, cache)

    def prefetch(self, event: RouteEvent, cache: CacheView) -> Sequence[tuple[int, int]]:
        return self.prefetcher.prefetch(event, cache)


# ---------------------------------------------------------------------------------------------------------------
# The registry: entry points of group "moe_env.policies" (this project's and any installed third party's).


def available_policies() -> dict[str, Any]:
    """Name -> entry point of every installed policy plug-in."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word or a path


def parse_policy_spec(spec: str) -> tuple[str, list[Any], dict[str, Any]]:
    """``"lfu-decay:decay=0.9"`` -> ("lfu-decay", [], {"decay": 0.9}); ``"ppo:a/b.zip"`` -> ("ppo", ["a/b.zip"], {})."""
    if not isinstance(spec, str) or not spec.strip():
        raise PolicySpecError("empty policy spec: give a name such as 'lru' or 'lfu-decay:decay=0.9'")
    name, _, arg = spec.strip().partition(":")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise PolicySpecError(f"malformed policy spec {spec!r}: expected NAME or NAME:ARG")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if arg:
        parts = [p for p in arg.split(",")]
        if all("=" in p for p in parts):
            for p in parts:
                key, _, value = p.partition("=")
                key = key.strip()
                if not key.isidentifier() or not value.strip():
                    raise PolicySpecError(f"malformed policy argument {p!r} in {spec!r}: expected key=value")
                kwargs[key] = _parse_value(value.strip())
        elif len(parts) == 1 or ("=" not in parts[0] and all("=" in p for p in parts[1:])):
            args.append(parts[0].strip())  # a path may not be literal-evaluated
            for p in parts[1:]:
                key, _, value = p.partition("=")
                kwargs[key.strip()] = _parse_value(value.strip())
        else:
            raise PolicySpecError(f"malformed policy spec {spec!r}: expected NAME:key=value[,key=value] or NAME:PATH")
    return name, args, kwargs


def _registered(name: str) -> Any:
    registry = available_policies()
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none installed (pip install -e .)"
        raise PolicySpecError(f"unknown policy {name!r}; known policies: {known}")
    return registry[name]


def _what_it_raised(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"exited (SystemExit {exc.code!r})"
    lines = str(exc).strip().splitlines()
    return f"raised {type(exc).__name__}: {lines[0]}" if lines else f"raised {type(exc).__name__}"


def _load_factory(name: str) -> Any:
    """Import the plug-in `name`; whatever its import raises becomes a PolicySpecError naming it."""
    entry = _registered(name)
    try:
        return entry.load()
    except (Exception, SystemExit) as exc:
        raise PolicySpecError(
            f"policy plug-in {name!r} ({entry.value}) failed to import: {_what_it_raised(exc)}"
        ) from None


def _is_prefetch_only(spec: str | Policy) -> bool | None:
    """Whether a spec names a prefetch-only plug-in; imports the plug-in but builds nothing (no checkpoint loads).
    None when only building would tell (a factory function rather than a Policy class)."""
    if isinstance(spec, Policy):
        return spec.prefetch_only
    factory = _load_factory(parse_policy_spec(spec)[0])
    return bool(getattr(factory, "prefetch_only", False)) if isinstance(factory, type) else None


def _is_none(spec: str | Policy | None) -> bool:
    return spec is None or (isinstance(spec, str) and spec.strip() == "none")


def check_policy_spec(spec: str | Policy | None, role: str = "policy") -> None:
    """Fail fast on a malformed spec, an unknown name or a plug-in in the wrong role, without building the policy
    (no checkpoint loads). `role` is "policy" (eviction) or "prefetch"."""
    if role == "prefetch" and _is_none(spec):
        return
    if spec is None:
        return
    if not isinstance(spec, Policy):
        _registered(parse_policy_spec(spec)[0])
    prefetch_only = _is_prefetch_only(spec)
    if prefetch_only is not None:  # else build_policy checks the built policy
        _check_role(spec, prefetch_only, role)


def _check_role(spec: str | Policy, prefetch_only: bool, role: str) -> None:
    name = spec.name if isinstance(spec, Policy) else spec.strip()
    if role == "policy" and prefetch_only:
        raise PolicySpecError(f"{name!r} is a prefetcher; pass it as --prefetch and give an eviction --policy")
    if role == "prefetch" and not prefetch_only:
        raise PolicySpecError(
            f"{name!r} is not a prefetcher (it never prefetches as --prefetch); choose one of "
            f"{', '.join(prefetcher_names()) or 'the installed prefetchers'}, or pass it as --policy"
        )


def prefetcher_names() -> list[str]:
    """Names of the installed prefetch-only plug-ins (those that import cleanly)."""
    names = []
    for name, entry in sorted(available_policies().items()):
        try:
            factory = entry.load()
        except (Exception, SystemExit):
            continue
        if isinstance(factory, type) and getattr(factory, "prefetch_only", False):
            names.append(name)
    return names


def make_policy(spec: str | Policy) -> Policy:
    """Build a policy from a spec string through the plug-in registry (or pass a Policy through).

    Whatever the plug-in raises while it is imported or built (bad argument values included) becomes a
    PolicySpecError naming the plug-in and what it raised: one line for the user, never a traceback."""
    if isinstance(spec, Policy):
        return spec
    name, args, kwargs = parse_policy_spec(spec)
    factory = _load_factory(name)
    try:
        policy = factory(*args, **kwargs)
    except MoeEnvError:  # the plug-in's own one-line message already says what is wrong
        raise
    except (TypeError, ValueError) as exc:
        raise PolicySpecError(f"bad arguments for policy {name!r} in {spec!r}: {_what_it_raised(exc)}") from None
    except (Exception, SystemExit) as exc:
        raise PolicySpecError(
            f"policy plug-in {name!r} failed to build from {spec!r}: {_what_it_raised(exc)}"
        ) from None
    if not isinstance(policy, Policy):
        raise PolicySpecError(f"plug-in {name!r} did not build a moe_env Policy (got {type(policy).__name__})")
    policy.name = spec.strip()
    return policy


def build_policy(policy: str | Policy, prefetch: str | Policy | None = None) -> Policy:
    """The policy a driver runs: eviction policy, optionally combined with a separate prefetcher (which must be a
    prefetch-only plug-in: an eviction policy given as prefetcher would silently prefetch nothing)."""
    evict = make_policy(policy)
    _check_role(evict, evict.prefetch_only, "policy")
    if _is_none(prefetch):
        return evict
    prefetcher = make_policy(prefetch)
    _check_role(prefetcher, prefetcher.prefetch_only, "prefetch")
    return CombinedPolicy(evict, prefetcher)


def validate_scores(scores: Any, n: int, policy: Policy) -> np.ndarray:
    """Scores must be n finite-or-infinite floats: anything else is the policy's bug, reported clearly."""
    try:
        arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"policy {policy.name!r} returned non-numeric eviction scores: {exc}") from None
    if arr.shape[0] != n:
        raise PolicyError(f"policy {policy.name!r} returned {arr.shape[0]} eviction scores for {n} candidates")
    if np.isnan(arr).any():
        raise PolicyError(f"policy {policy.name!r} returned NaN eviction scores")
    return arr
