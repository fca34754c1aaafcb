"""Qwen2-MoE and Qwen3-MoE: the shared expert (Qwen2) and mlp_only_layers stay resident as ordinary modules."""

from moe_env.models.base import ModelAdapter


class QwenMoeAdapter(ModelAdapter):
    model_types = ("qwen2_moe", "qwen3_moe")
