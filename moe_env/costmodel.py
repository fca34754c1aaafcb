"""Time model of offloaded MoE decoding: one FIFO copy link, per-layer compute, copies overlapping compute.

Decode at batch 1 is memory-bound, so compute times are derived from bytes read over the device's memory
bandwidth (plus a fixed per-layer kernel overhead); copies cost ``latency + bytes / link bandwidth``. A
``CostModel`` pairs a ``HardwareProfile`` with an ``ExpertProfile`` (expert size of a real model); the spec
``HARDWARE[:EXPERTS]`` names both, e.g. ``consumer-pcie4:mixtral-8x7b-4bit``. Without ``:EXPERTS`` the trace's
recorded expert size is used ("as-recorded"). All figures are in seconds and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_env.errors import UsageError

GB = 1e9


@dataclass(frozen=True)
class HardwareProfile:
    """The machine: where the experts live (link to the compute device) and how fast the device computes."""

    name: str
    link_gb_s: float  # effective host->device copy bandwidth, GB/s
    link_latency_s: float  # fixed cost per copy (driver, DMA setup, NVMe command)
    device_mem_gb_s: float  # effective memory bandwidth of the computing device (decode reads every weight once)
    layer_overhead_s: float  # per layer per token: kernel launches, router, norms
    description: str = ""


@dataclass(frozen=True)
class ExpertProfile:
    """Sizes of a real MoE model. ``dense_bytes_per_layer``: attention (+ shared experts) read once per token."""

    name: str
    expert_bytes: int
    num_layers: int
    num_experts: int
    top_k: int
    dense_bytes_per_layer: int = 0
    description: str = ""


def _ffn_bytes(hidden: int, intermediate: int, bits: float) -> int:
    """One gated FFN expert (gate, up, down projections): 3 * hidden * intermediate weights."""
    return int(3 * hidden * intermediate * bits / 8)


def _attention_bytes(hidden: int, heads: int, kv_heads: int, head_dim: int, bits: float = 16) -> int:
    params = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    return int(params * bits / 8)


def _mixtral(bits: int) -> ExpertProfile:
    # mistralai/Mixtral-8x7B-v0.1 config: hidden 4096, intermediate 14336, 32 layers, 8 experts, top-2, 32/8 heads
    return ExpertProfile(
        name=f"mixtral-8x7b-{'fp16' if bits == 16 else f'{bits}bit'}",
        expert_bytes=_ffn_bytes(4096, 14336, bits),
        num_layers=32,
        num_experts=8,
        top_k=2,
        dense_bytes_per_layer=_attention_bytes(4096, 32, 8, 128),
        description=f"Mixtral-8x7B, experts at {bits} bits/weight (quantisation scales not counted), attention fp16",
    )


HARDWARE_PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile("consumer-pcie4", 25.0, 10e-6, 800.0, 30e-6, "RTX 4090 (1 TB/s GDDR6X) on PCIe 4.0 x16"),
        HardwareProfile("datacenter-pcie5", 50.0, 8e-6, 2500.0, 20e-6, "H100 PCIe (3.35 TB/s HBM) on PCIe 5.0 x16"),
        HardwareProfile("cpu-nvme", 5.0, 100e-6, 60.0, 50e-6, "CPU decoding (DDR5 ~60 GB/s), experts on NVMe Gen4"),
    )
}

EXPERT_PROFILES: dict[str, ExpertProfile] = {
    p.name: p
    for p in (
        _mixtral(16),
        _mixtral(4),
        _mixtral(2),
        # allenai/OLMoE-1B-7B-0924: hidden 2048, intermediate 1024, 16 layers, 64 experts, top-8, 16 heads
        ExpertProfile("olmoe-1b-7b", _ffn_bytes(2048, 1024, 16), 16, 64, 8, _attention_bytes(2048, 16, 16, 128)),
        # Qwen/Qwen1.5-MoE-A2.7B: hidden 2048, moe_intermediate 1408, 24 layers, 60 experts, top-4,
        # shared expert intermediate 5632 (read every token: counted as dense)
        ExpertProfile(
            "qwen1.5-moe-a2.7b",
            _ffn_bytes(2048, 1408, 16),
            24,
            60,
            4,
            _attention_bytes(2048, 16, 16, 128) + _ffn_bytes(2048, 5632, 16),
        ),
        # Qwen/Qwen2-57B-A14B: hidden 3584, moe_intermediate 2560, 28 layers, 64 experts, top-8, 28/4 heads,
        # shared expert intermediate 20480
        ExpertProfile(
            "qwen2-57b-a14b",
            _ffn_bytes(3584, 2560, 16),
            28,
            64,
            8,
            _attention_bytes(3584, 28, 4, 128) + _ffn_bytes(3584, 20480, 16),
        ),
        # deepseek-ai/DeepSeek-V2-Lite: hidden 2048, moe_intermediate 1408, 26 MoE layers (of 27), 64 routed experts,
        # top-6, 2 shared experts; MLA attention ~13.8 M params (q 2048x3072, kv_a 2048x576, kv_b 512x4096, o 2048x2048)
        ExpertProfile(
            "deepseek-v2-lite",
            _ffn_bytes(2048, 1408, 16),
            26,
            64,
            6,
            2 * (2048 * 3072 + 2048 * 576 + 512 * 4096 + 2048 * 2048) + 2 * _ffn_bytes(2048, 1408, 16),
        ),
    )
}

AS_RECORDED = "as-recorded"
DEFAULT_PROFILE = "consumer-pcie4"


@dataclass(frozen=True)
class CostModel:
    """Seconds per operation for one hardware/expert-size pair."""

    hardware: HardwareProfile
    experts: ExpertProfile

    @property
    def name(self) -> str:
        return f"{self.hardware.name}:{self.experts.name}"

    @property
    def expert_bytes(self) -> int:
        return self.experts.expert_bytes

    @property
    def copy_s(self) -> float:
        """One expert over the link: latency + bytes / bandwidth."""
        return self.hardware.link_latency_s + self.experts.expert_bytes / (self.hardware.link_gb_s * GB)

    @property
    def expert_compute_s(self) -> float:
        """One expert applied to one token: its weights streamed once from device memory."""
        return self.experts.expert_bytes / (self.hardware.device_mem_gb_s * GB)

    @property
    def layer_compute_s(self) -> float:
        """Non-expert work of one layer for one token (attention, shared experts, router, norms)."""
        return self.hardware.layer_overhead_s + self.experts.dense_bytes_per_layer / (
            self.hardware.device_mem_gb_s * GB
        )


def recorded_experts(expert_bytes: int, num_layers: int, num_experts: int, top_k: int, model: str) -> ExpertProfile:
    """The expert size a trace recorded; dense work is unknown, so only the per-layer overhead is charged."""
    if expert_bytes <= 0:
        raise UsageError(
            f"the trace of {model or 'this model'} does not record its expert size; name one in the profile, "
            f"e.g. --profile {DEFAULT_PROFILE}:mixtral-8x7b-fp16 (known: {', '.join(EXPERT_PROFILES)})"
        )
    return ExpertProfile(AS_RECORDED, expert_bytes, num_layers, num_experts, top_k, 0, f"as recorded for {model}")


def resolve_profile(spec: str, recorded: ExpertProfile | None = None) -> CostModel:
    """``HARDWARE[:EXPERTS]`` -> CostModel; EXPERTS defaults to ``as-recorded`` (needs `recorded`)."""
    hardware_name, _, experts_name = (spec or DEFAULT_PROFILE).strip().partition(":")
    if hardware_name not in HARDWARE_PROFILES:
        raise UsageError(f"unknown hardware profile {hardware_name!r}; known: {', '.join(HARDWARE_PROFILES)}")
    experts_name = experts_name.strip() or AS_RECORDED
    if experts_name == AS_RECORDED:
        if recorded is None:
            raise UsageError(f"profile {spec!r} needs a trace's recorded expert size; name an expert profile instead")
        experts = recorded
    elif experts_name in EXPERT_PROFILES:
        experts = EXPERT_PROFILES[experts_name]
    else:
        known = ", ".join([AS_RECORDED, *EXPERT_PROFILES])
        raise UsageError(f"unknown expert profile {experts_name!r}; known: {known}")
    return CostModel(HARDWARE_PROFILES[hardware_name], experts)
