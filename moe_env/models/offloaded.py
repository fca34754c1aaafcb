"""The module that replaces a MoE block's ``.experts``: same call signature, weights served by the expert cache."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class LayerRunner(Protocol):
    """What computes one MoE layer's experts (moe_env.offload.OffloadRuntime)."""

    def forward_layer(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor: ...


class OffloadedExperts(nn.Module):
    """Holds no expert weights; `forward` delegates to the runtime, which loads experts through the cache."""

    def __init__(self, layer: int, num_experts: int, act_fn: nn.Module, runner: LayerRunner):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.act_fn = act_fn
        self._runner = runner  # not a submodule: the runtime owns tensors that must stay out of state_dict

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self._runner.forward_layer(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"
