"""The model adapter: find a family's MoE blocks, describe its experts, pack one expert into one flat buffer.

Every supported family (transformers 5.x) has a sparse block with a ``.gate`` router (forward(hidden [n, H]) ->
(router_logits [n, E], top_k_weights [n, k], top_k_index [n, k])) and an ``.experts`` module holding fused
parameters ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. The router stays as it is (routing is then
exact by construction: softmax/top-k order, group-limited routing, shared experts); only ``.experts`` is swapped
for an OffloadedExperts module. Family modules differ only in which ``model_type``s they claim and in how the
next layer's gate turns this layer's input into lookahead logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moe_env.errors import ModelError


@dataclass(frozen=True)
class ExpertShape:
    """Shape of one expert: packed as gate_up [2I, H] flattened, then down [H, I] flattened."""

    hidden: int
    intermediate: int
    dtype: torch.dtype

    @property
    def gate_up_numel(self) -> int:
        return 2 * self.intermediate * self.hidden

    @property
    def numel(self) -> int:
        return 3 * self.intermediate * self.hidden

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (gate_up [2I, H], down [H, I]) into a packed buffer: no copy."""
        split = self.gate_up_numel
        gate_up = flat[:split].view(2 * self.intermediate, self.hidden)
        down = flat[split:].view(self.hidden, self.intermediate)
        return gate_up, down


@dataclass
class MoeLayer:
    """One MoE block: `index` counts MoE layers only (the cache's layer id); `decoder_index` is its decoder layer."""

    index: int
    decoder_index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


class ModelAdapter:
    """Generic adapter over the fused-experts layout; family subclasses name their model types."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = self._find_layers(model)
        if not self.layers:
            raise ModelError(f"model type {model.config.model_type!r} has no MoE layer: nothing to offload")
        first = self.layers[0].experts
        self.num_experts = int(first.gate_up_proj.shape[0])
        self.top_k = int(self.layers[0].router.top_k)
        self.shape = ExpertShape(
            hidden=int(first.gate_up_proj.shape[2]),
            intermediate=int(first.gate_up_proj.shape[1]) // 2,
            dtype=first.gate_up_proj.dtype,
        )
        for layer in self.layers:
            experts = layer.experts
            if tuple(experts.gate_up_proj.shape) != tuple(first.gate_up_proj.shape) or tuple(
                experts.down_proj.shape
            ) != tuple(first.down_proj.shape):
                raise ModelError(f"MoE layer {layer.index} has expert shapes unlike layer 0: not supported")

    @staticmethod
    def decoder_layers(model: nn.Module) -> nn.ModuleList:
        inner = getattr(model, "model", model)
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ModelError(f"model type {model.config.model_type!r} has no decoder layer list (model.layers)")
        return layers

    def _find_layers(self, model: nn.Module) -> list[MoeLayer]:
        found: list[MoeLayer] = []
        for decoder_index, decoder_layer in enumerate(self.decoder_layers(model)):
            block = getattr(decoder_layer, "mlp", None)
            experts = getattr(block, "experts", None)
            router = getattr(block, "gate", None)
            if experts is None or router is None:
                continue  # a dense layer (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)
            if not (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj") and hasattr(router, "weight")):
                raise ModelError(
                    f"decoder layer {decoder_index}: expert module {type(experts).__name__} lacks fused "
                    "gate_up_proj/down_proj: this transformers layout is not supported"
                )
            found.append(MoeLayer(len(found), decoder_index, block, router, experts))
        return found

    # -- weights -----------------------------------------------------------------------------------------------
    def pack_expert(self, layer: int, expert: int) -> torch.Tensor:
        """One expert's weights as one flat contiguous CPU tensor (gate_up then down)."""
        experts = self.layers[layer].experts
        gate_up = experts.gate_up_proj.detach()[expert].reshape(-1)
        down = experts.down_proj.detach()[expert].reshape(-1)
        return torch.cat([gate_up, down]).cpu().contiguous()

    # -- routing signal ----------------------------------------------------------------------------------------
    def raw_logits(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The logits `router` would compute for `hidden` [n, H], as float32 (the lookahead signal)."""
        return F.linear(hidden.to(router.weight.dtype), router.weight).float()
