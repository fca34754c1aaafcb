"""Model adapters, one per Hugging Face MoE family, dispatched on ``config.model_type``."""

from __future__ import annotations

from torch import nn

from moe_env.errors import ModelError
from moe_env.models.base import ExpertShape, ModelAdapter, MoeLayer
from moe_env.models.deepseek import DeepseekAdapter
from moe_env.models.mixtral import MixtralAdapter
from moe_env.models.olmoe import OlmoeAdapter
from moe_env.models.qwen_moe import QwenMoeAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (MixtralAdapter, QwenMoeAdapter, OlmoeAdapter, DeepseekAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of `model`'s family; ModelError (one line) for a non-MoE or unsupported model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise ModelError(
        f"model type {model_type!r} is not a supported MoE family; supported: {', '.join(supported_model_types())}"
    )


__all__ = ["ADAPTERS", "ExpertShape", "ModelAdapter", "MoeLayer", "adapter_for", "supported_model_types"]
