"""Small random-weight models of every supported family, built from a config (tests and benches).

Random weights route in a varied way, which is what exactness tests and copy benchmarks need; they say nothing
about real routing locality (use the embedded trained models or real traces for that).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}

_FAMILY: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 48, "num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 8},
    "qwen2_moe": {
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        "head_dim": 8,
    },
    "olmoe": {"intermediate_size": 24, "num_experts": 16, "num_experts_per_tok": 4},
    "deepseek_v2": {
        "num_hidden_layers": 3,
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
    },
    "deepseek_v3": {
        "num_hidden_layers": 3,
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
    },
}


def tiny_config(family: str, **overrides: Any):
    """A transformers config of `family` with tiny dimensions; `overrides` replace any field."""
    if family not in _FAMILY:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    fields = {**_COMMON, **_FAMILY[family], **overrides}
    return AutoConfig.for_model(family, **fields)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> PreTrainedModel:
    """A random-weight causal LM of `family` (eager experts: the bitwise reference), in eval mode."""
    config = tiny_config(family, **overrides)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if family == "deepseek_v3":
        with torch.no_grad():  # a nonzero selection bias exercises the biased group-limited routing
            generator = torch.Generator().manual_seed(seed)
            for layer in model.model.layers:
                router = getattr(layer.mlp, "gate", None)
                if router is not None:
                    router.e_score_correction_bias.copy_(
                        0.1 * torch.randn(router.num_experts, generator=generator, device="cpu")
                    )
    return model.eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges (ids 0..255): lossless for any text, for untrained placeholder models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
