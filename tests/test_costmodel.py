"""Expert sizes from public configs, profile specs, and the copy/compute formulas."""

import pytest

from moe_env.costmodel import (
    EXPERT_PROFILES,
    GB,
    HARDWARE_PROFILES,
    CostModel,
    recorded_experts,
    resolve_profile,
)
from moe_env.errors import UsageError
from moe_env.sim import cost_model_for
from moe_env.trace import TraceMeta


def test_expert_sizes_of_real_models():
    assert EXPERT_PROFILES["mixtral-8x7b-fp16"].expert_bytes == 3 * 4096 * 14336 * 2 == 352_321_536
    assert EXPERT_PROFILES["mixtral-8x7b-4bit"].expert_bytes == 352_321_536 // 4
    assert EXPERT_PROFILES["mixtral-8x7b-2bit"].expert_bytes == 352_321_536 // 8
    assert EXPERT_PROFILES["olmoe-1b-7b"].expert_bytes == 3 * 2048 * 1024 * 2
    assert EXPERT_PROFILES["qwen1.5-moe-a2.7b"].expert_bytes == 3 * 2048 * 1408 * 2
    assert EXPERT_PROFILES["deepseek-v2-lite"].expert_bytes == 3 * 2048 * 1408 * 2
    shapes = {p.name: (p.num_layers, p.num_experts, p.top_k) for p in EXPERT_PROFILES.values()}
    assert shapes["mixtral-8x7b-fp16"] == (32, 8, 2)
    assert shapes["olmoe-1b-7b"] == (16, 64, 8)
    assert shapes["deepseek-v2-lite"] == (26, 64, 6)


def test_spec_resolution_and_formulas():
    cost = resolve_profile("consumer-pcie4:mixtral-8x7b-4bit")
    hw = HARDWARE_PROFILES["consumer-pcie4"]
    assert cost.name == "consumer-pcie4:mixtral-8x7b-4bit"
    assert cost.copy_s == pytest.approx(hw.link_latency_s + 88_080_384 / (hw.link_gb_s * GB))
    assert cost.expert_compute_s == pytest.approx(88_080_384 / (hw.device_mem_gb_s * GB))
    assert cost.layer_compute_s > hw.layer_overhead_s  # attention bytes are charged
    # copies are far slower than compute on every named machine: the premise of offloading research
    for name in HARDWARE_PROFILES:
        c = resolve_profile(f"{name}:mixtral-8x7b-fp16")
        assert c.copy_s > 10 * c.expert_compute_s


def test_as_recorded_uses_the_trace_size():
    meta = TraceMeta("m", 4, 8, 2, "record", expert_bytes=1_000_000)
    cost = cost_model_for(meta, "cpu-nvme")
    assert isinstance(cost, CostModel) and cost.expert_bytes == 1_000_000
    assert cost_model_for(meta, "cpu-nvme:as-recorded").expert_bytes == 1_000_000
    assert cost_model_for(meta, "cpu-nvme:olmoe-1b-7b").expert_bytes == 12_582_912


@pytest.mark.parametrize(
    "spec, fragment",
    [("gpu9000", "unknown hardware profile"), ("consumer-pcie4:gpt-5", "unknown expert profile")],
)
def test_bad_specs_are_usage_errors(spec, fragment):
    with pytest.raises(UsageError, match=fragment):
        resolve_profile(spec)


def test_unrecorded_size_needs_a_named_profile():
    with pytest.raises(UsageError, match="does not record its expert size"):
        recorded_experts(0, 32, 8, 2, "mixtral")
    with pytest.raises(UsageError, match="does not record"):
        cost_model_for(TraceMeta("m", 4, 8, 2, "convert:jsonl"), "consumer-pcie4")
    # a converted Mixtral-8x7B log (32 layers, 8 experts, top-2) gets the real model's fp16 expert size
    mixtral = cost_model_for(TraceMeta("mixtral", 32, 8, 2, "convert:jsonl"), "cpu-nvme")
    assert mixtral.name == "cpu-nvme:mixtral-8x7b-fp16"
