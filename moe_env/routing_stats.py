"""Routing statistics of a Mixture-of-Experts model, measured on its top-k expert selections.

This is the one place in the project that defines what "realistic routing" means; the embedded models, their
tests and the trace tools all use it.

A *selection array* holds one sequence's routing decisions: an integer array of shape ``[tokens, layers, top_k]``
whose entry ``[t, l, j]`` is the j-th expert that layer ``l`` selected for token ``t``.

Statistics (``E`` experts, ``k`` selected per token):

* usage entropy ratio of a layer: entropy of that layer's expert-usage distribution (share of all of the layer's
  selections that went to each expert, pooled over all sequences) divided by ``log(E)``; 1.0 is perfectly uniform.
* min expert share: the smallest share of a layer's selections that any single expert received (min over layers).
* prev-token reuse: ``|S_t ∩ S_{t-1}| / k`` averaged over consecutive token pairs (within a sequence) and over
  layers, where ``S_t`` is the set of experts selected for token ``t``. Chance (independent uniform routing) is
  ``k / E``; real Mixtral-8x7B sits around 1.5x chance.

Use :func:`collect_selections` to obtain selection arrays from a Hugging Face transformers MoE model (every MoE
block in transformers 5.x has a ``.gate`` router returning ``(router_logits, top_k_weights, top_k_index)`` and an
``.experts`` module), then :func:`routing_statistics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["RoutingStats", "collect_selections", "find_routers", "routing_statistics"]


@dataclass(frozen=True)
class RoutingStats:
    """Summary of routing behaviour; see the module docstring for definitions."""

    num_experts: int
    top_k: int
    num_layers: int
    num_tokens: int
    usage_entropy_ratio: list[float]
    usage_entropy_ratio_min: float
    min_expert_share: float
    max_expert_share: float
    prev_token_reuse: float
    prev_token_reuse_over_chance: float
    prev_token_reuse_per_layer: list[float]

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of all fields."""
        return asdict(self)


def routing_statistics(selections: Sequence[np.ndarray], num_experts: int) -> RoutingStats:
    """Compute :class:`RoutingStats` from per-sequence selection arrays of shape ``[tokens, layers, top_k]``.

    Usage is pooled over all sequences; prev-token pairs never cross a sequence boundary. Raises ``ValueError``
    on empty input, inconsistent shapes or expert ids outside ``[0, num_experts)``.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    arrays = [np.asarray(s) for s in selections]
    arrays = [a for a in arrays if a.size > 0]
    if not arrays:
        raise ValueError("routing_statistics needs at least one non-empty selection array")
    for a in arrays:
        if a.ndim != 3:
            raise ValueError(f"selection arrays must have shape [tokens, layers, top_k], got {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"selection arrays must be integer, got {a.dtype}")
    _, num_layers, top_k = arrays[0].shape
    for a in arrays:
        if a.shape[1:] != (num_layers, top_k):
            raise ValueError(f"inconsistent selection shapes: {a.shape} vs [*, {num_layers}, {top_k}]")
        if a.min() < 0 or a.max() >= num_experts:
            raise ValueError(f"expert ids must lie in [0, {num_experts}), got range [{a.min()}, {a.max()}]")

    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    reuse_sum = np.zeros(num_layers, dtype=np.float64)
    pairs = 0
    for a in arrays:
        for layer in range(num_layers):
            counts[layer] += np.bincount(a[:, layer, :].reshape(-1), minlength=num_experts)
        if a.shape[0] >= 2:
            # one-hot membership [tokens, layers, E]; duplicates within a top-k set count once
            member = np.zeros((a.shape[0], num_layers, num_experts), dtype=bool)
            t_idx, l_idx, _ = np.indices(a.shape)
            member[t_idx, l_idx, a] = True
            inter = np.logical_and(member[1:], member[:-1]).sum(axis=-1)  # [tokens-1, layers]
            reuse_sum += inter.sum(axis=0) / top_k
            pairs += a.shape[0] - 1

    shares = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(shares > 0, shares * np.log(shares), 0.0).sum(axis=1)
    ratio = ent / math.log(num_experts) if num_experts > 1 else np.ones(num_layers)
    if pairs:
        per_layer_reuse = reuse_sum / pairs
        reuse = float(per_layer_reuse.mean())
    else:
        per_layer_reuse = np.full(num_layers, float("nan"))
        reuse = float("nan")
    chance = top_k / num_experts
    return RoutingStats(
        num_experts=int(num_experts),
        top_k=int(top_k),
        num_layers=int(num_layers),
        num_tokens=int(sum(a.shape[0] for a in arrays)),
        usage_entropy_ratio=[float(x) for x in ratio],
        usage_entropy_ratio_min=float(ratio.min()),
        min_expert_share=float(shares.min()),
        max_expert_share=float(shares.max()),
        prev_token_reuse=reuse,
        prev_token_reuse_over_chance=reuse / chance,
        prev_token_reuse_per_layer=[float(x) for x in per_layer_reuse],
    )


def find_routers(model) -> list:
    """The router modules of a transformers MoE model, in layer order.

    A router is the ``.gate`` of any module that has both ``.gate`` and ``.experts`` (the transformers 5.x MoE
    block layout).
    """
    routers = []
    for module in model.modules():
        gate = getattr(module, "gate", None)
        if gate is not None and hasattr(module, "experts") and callable(gate):
            routers.append(gate)
    return routers


def collect_selections(model, input_ids_list, max_tokens: int | None = None) -> list[np.ndarray]:
    """Run ``model`` on each token-id sequence and return its top-k selections, ``[tokens, layers, top_k]`` each.

    ``input_ids_list`` is an iterable of 1-D sequences (lists, numpy arrays or tensors) of token ids; each is run
    as its own batch of one, truncated to ``max_tokens`` if given. Selections are captured by forward hooks on
    the routers (see :func:`find_routers`), whose output's last element is the ``top_k_index`` tensor.
    """
    import torch

    routers = find_routers(model)
    if not routers:
        raise ValueError("no MoE routers found (expected modules with .gate and .experts)")
    captured: list[list[torch.Tensor]] = [[] for _ in routers]

    def make_hook(i):
        def hook(_module, _inputs, output):
            index = output[-1] if isinstance(output, tuple) else output
            captured[i].append(index.detach().to("cpu"))

        return hook

    handles = [r.register_forward_hook(make_hook(i)) for i, r in enumerate(routers)]
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in input_ids_list:
                ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(-1)
                if max_tokens is not None:
                    ids = ids[:max_tokens]
                if ids.numel() == 0:
                    continue
                for c in captured:
                    c.clear()
                model(input_ids=ids[None].to(device), use_cache=False)
                per_layer = [c[-1].reshape(ids.numel(), -1) for c in captured]
                out.append(torch.stack(per_layer, dim=1).numpy().astype(np.int64))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out
