"""Mixtral (MixtralSparseMoeBlock at layer.mlp): softmax over logits, top-k, renormalised."""

from moe_env.models.base import ModelAdapter


class MixtralAdapter(ModelAdapter):
    model_types = ("mixtral",)
