"""OLMoE (OlmoeSparseMoeBlock at layer.mlp): softmax top-k routing, many small experts."""

from moe_env.models.base import ModelAdapter


class OlmoeAdapter(ModelAdapter):
    model_types = ("olmoe",)
