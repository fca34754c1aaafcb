"""Hand-computable cases for moe_env.routing_stats."""

import math

import numpy as np
import pytest

from moe_env.routing_stats import collect_selections, routing_statistics


def sel(rows):
    """[[layer0 experts], [layer1 experts], ...] per token -> [tokens, layers, k]."""
    return np.asarray(rows, dtype=np.int64)


def test_uniform_rotation():
    # E=4, k=2, one layer: every expert used twice of 8 -> uniform; consecutive sets share exactly one expert.
    s = sel([[[0, 1]], [[1, 2]], [[2, 3]], [[3, 0]]])
    st = routing_statistics([s], num_experts=4)
    assert st.usage_entropy_ratio == pytest.approx([1.0])
    assert st.usage_entropy_ratio_min == pytest.approx(1.0)
    assert st.min_expert_share == pytest.approx(0.25)
    assert st.max_expert_share == pytest.approx(0.25)
    assert st.prev_token_reuse == pytest.approx(0.5)
    assert st.prev_token_reuse_over_chance == pytest.approx(1.0)  # chance = k/E = 0.5
    assert (st.num_experts, st.top_k, st.num_layers, st.num_tokens) == (4, 2, 1, 4)


def test_collapsed_routing():
    s = sel([[[0]], [[0]], [[0]]])
    st = routing_statistics([s], num_experts=4)
    assert st.usage_entropy_ratio_min == pytest.approx(0.0)
    assert st.min_expert_share == 0.0
    assert st.max_expert_share == 1.0
    assert st.prev_token_reuse == pytest.approx(1.0)
    assert st.prev_token_reuse_over_chance == pytest.approx(4.0)


def test_two_layers_two_sequences_pairs_do_not_cross_sequences():
    # E=2, k=1. Layer 0: A=[0,1], B=[1,1]; layer 1: A=[0,0], B=[1,1].
    a = sel([[[0], [0]], [[1], [0]]])
    b = sel([[[1], [1]], [[1], [1]]])
    st = routing_statistics([a, b], num_experts=2)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert st.usage_entropy_ratio == pytest.approx([h, 1.0])
    assert st.usage_entropy_ratio_min == pytest.approx(h)  # 0.8113
    assert st.min_expert_share == pytest.approx(0.25)
    # layer 0 pairs: A (0->1) = 0, B (1->1) = 1 -> 0.5; layer 1: A 1, B 1 -> 1.0 (the A->B boundary is no pair)
    assert st.prev_token_reuse_per_layer == pytest.approx([0.5, 1.0])
    assert st.prev_token_reuse == pytest.approx(0.75)
    assert st.prev_token_reuse_over_chance == pytest.approx(1.5)
    d = st.to_dict()
    assert d["prev_token_reuse"] == pytest.approx(0.75)
    assert d["usage_entropy_ratio"] == pytest.approx([h, 1.0])


def test_single_token_sequences_have_no_pairs():
    st = routing_statistics([sel([[[0, 1]]]), sel([[[2, 3]]])], num_experts=4)
    assert st.usage_entropy_ratio_min == pytest.approx(1.0)
    assert math.isnan(st.prev_token_reuse)


@pytest.mark.parametrize(
    "arrays",
    [
        [],
        [np.zeros((3, 2), dtype=np.int64)],
        [np.full((2, 1, 1), 4, dtype=np.int64)],
        [np.zeros((2, 1, 1), dtype=np.int64), np.zeros((2, 2, 1), dtype=np.int64)],
        [np.zeros((2, 1, 1), dtype=np.float32)],
    ],
)
def test_invalid_input(arrays):
    with pytest.raises(ValueError):
        routing_statistics(arrays, num_experts=4)


def test_collect_selections_matches_router_output():
    torch = pytest.importorskip("torch")
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(cfg).eval()
    ids = [np.arange(10) % 64, np.array([5, 6, 7])]
    sels = collect_selections(model, ids)
    assert [s.shape for s in sels] == [(10, 2, 2), (3, 2, 2)]
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids[0])[None], output_router_logits=True)
    for layer, logits in enumerate(out.router_logits):
        expected = torch.topk(logits, 2, dim=-1).indices.numpy()
        assert np.array_equal(np.sort(sels[0][:, layer, :], axis=-1), np.sort(expected, axis=-1))
    st = routing_statistics(sels, num_experts=4)
    assert st.num_tokens == 13 and st.num_layers == 2
