"""Shapes of the real MoE models that imported logs come from, so that a log names its model, not its file.

A known name (an expert profile of moe_env.costmodel, e.g. "deepseek-v2-lite", or its family prefix such as
"mixtral-8x7b") fixes the number of experts and is checked against the log's layers and top-k: a log of a few
prompts that never routed to the last expert still gets the model's shape, so two logs of one model match.
"""

from __future__ import annotations

from moe_env.costmodel import EXPERT_PROFILES, ExpertProfile
from moe_env.errors import TraceFormatError


def known_model(name: str) -> ExpertProfile | None:
    key = name.strip().lower()
    if key in EXPERT_PROFILES:
        return EXPERT_PROFILES[key]
    family = [p for p in EXPERT_PROFILES.values() if p.name.startswith(key + "-")]
    shapes = {(p.num_layers, p.num_experts, p.top_k) for p in family}
    return family[0] if len(shapes) == 1 else None


def resolve_shape(
    name: str,
    num_layers: int,
    top_k: int,
    seen_experts: int,
    num_experts: int | None,
    where: str,
    distinct_experts: int | None = None,
) -> int:
    """The expert count of a log of model `name` with `num_layers` layers, top-`top_k` routing and ids up to
    ``seen_experts - 1``; `num_experts` is the user's override. Refuses what contradicts the known model, and an
    inferred count that the ids do not fill (`distinct_experts` ids used of 0..seen-1: a stray id, not a shape)."""
    profile = known_model(name)
    if profile is not None:
        if (num_layers, top_k) != (profile.num_layers, profile.top_k):
            raise TraceFormatError(
                f"{where}: {num_layers} layers with top-{top_k} routing, but {name} has {profile.num_layers} layers "
                f"with top-{profile.top_k}; name the model it comes from: "
                "moe-env convert LOG --model-name NAME --out T.npz"
            )
        if num_experts is not None and num_experts != profile.num_experts:
            raise TraceFormatError(
                f"{where}: {name} has {profile.num_experts} experts, not --num-experts {num_experts}"
            )
        num_experts = profile.num_experts
    if num_experts is None and distinct_experts is not None and distinct_experts * 2 < seen_experts:
        raise TraceFormatError(
            f"{where}: expert ids reach {seen_experts - 1} but only {distinct_experts} distinct ids are used "
            "(a stray id?); fix the log, or confirm the count with --num-experts E"
        )
    num_experts = num_experts or seen_experts
    if seen_experts > num_experts:
        raise TraceFormatError(
            f"{where}: expert id {seen_experts - 1} >= {num_experts} experts of {name or 'the model'}"
        )
    if top_k > num_experts:
        raise TraceFormatError(f"{where}: top-{top_k} routing over {num_experts} experts; pass --num-experts")
    return num_experts
