"""The host tier and the checkpoint reader: pread copies, stores streamed from a model directory, the skeleton."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import PROMPT_IDS
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from moe_env import checkpoint
from moe_env.checkpoint import CheckpointExperts, CheckpointLayoutError, load_skeleton, pread_into
from moe_env.engine import EngineConfig, OffloadEngine, greedy_decode
from moe_env.models import adapter_for
from moe_env.models.tiny import FAMILIES, tiny_model
from moe_env.store import DiskExpertStore
from moe_env.transfer import LINKS, ThreadCopyEngine

CPU = torch.device("cpu")


def _experts(adapter):
    return [(layer, expert) for layer in range(len(adapter.layers)) for expert in range(adapter.num_experts)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_into_a_slot_is_byte_identical_to_the_packed_expert(tmp_path, dtype):
    adapter = adapter_for(tiny_model("olmoe", dtype=dtype))
    store = DiskExpertStore.write(adapter, tmp_path / "experts.safetensors")
    pool = torch.zeros((3, adapter.shape.numel), dtype=dtype)  # slots at nonzero offsets, as in SlotPools
    for layer, expert in _experts(adapter):
        slot = pool[expert % 3]
        store.read_into(layer, expert, slot)
        packed = adapter.pack_expert(layer, expert)
        assert torch.equal(slot.view(torch.uint8), packed.view(torch.uint8))
        assert torch.equal(store.source(layer, expert).view(torch.uint8), packed.view(torch.uint8))
    with pytest.raises(ValueError, match="destination"):
        store.read_into(0, 0, torch.zeros(adapter.shape.numel + 1, dtype=dtype))
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.read_into(0, 0, pool[0])


def test_the_store_is_a_valid_safetensors_file(tmp_path):
    adapter = adapter_for(tiny_model("mixtral"))
    path = tmp_path / "experts.safetensors"
    DiskExpertStore.write(adapter, path).close()
    with safe_open(str(path), "pt") as f:
        assert len(list(f.keys())) == len(_experts(adapter))
        for layer, expert in _experts(adapter):
            assert torch.equal(f.get_tensor(f"layer{layer}.expert{expert}"), adapter.pack_expert(layer, expert))


def test_pread_into_completes_short_reads(tmp_path, monkeypatch):
    data = torch.arange(1000, dtype=torch.float32)
    path = tmp_path / "blob"
    path.write_bytes(b"xyz" + data.numpy().tobytes())
    real = os.preadv
    calls = []

    def short(fd, buffers, offset):  # at most 100 bytes per call, as a signal-interrupted read may return
        calls.append(offset)
        return real(fd, [buffers[0][:100]], offset)

    monkeypatch.setattr(checkpoint.os, "preadv", short)
    dest = torch.empty(1000, dtype=torch.float32)
    fd = os.open(path, os.O_RDONLY)
    try:
        pread_into(fd, 3, dest)
        assert torch.equal(dest, data) and len(calls) == 40
        with pytest.raises(OSError, match="short read"):  # past the end of the file
            pread_into(fd, 100, torch.empty(1000, dtype=torch.float32))
    finally:
        os.close(fd)


@pytest.mark.parametrize("family", FAMILIES)
def test_store_streamed_from_a_checkpoint_equals_the_in_memory_one(tmp_path, family):
    model = tiny_model(family, seed=3)
    model.save_pretrained(tmp_path / "model")
    adapter = adapter_for(model)
    skeleton = load_skeleton(tmp_path / "model")
    with CheckpointExperts(tmp_path / "model", adapter_for(skeleton)) as experts:
        streamed = DiskExpertStore.write(adapter_for(skeleton), tmp_path / "streamed.safetensors", experts.pack)
    packed = DiskExpertStore.write(adapter, tmp_path / "packed.safetensors")
    for layer, expert in _experts(adapter):
        assert torch.equal(streamed.source(layer, expert), packed.source(layer, expert)), (layer, expert)
    streamed.close()
    packed.close()


@pytest.mark.parametrize("layout", ["gate_up", "gate_and_up"])
def test_fused_checkpoints_are_read_one_expert_slice_at_a_time(tmp_path, layout):
    model = tiny_model("qwen3_moe", seed=4)
    model.config.save_pretrained(tmp_path)
    adapter = adapter_for(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # the fused in-memory names
    if layout == "gate_and_up":
        for layer in adapter.layers:
            prefix = f"model.layers.{layer.decoder_index}.mlp.experts."
            gate, up = state.pop(prefix + "gate_up_proj").chunk(2, dim=1)
            state[prefix + "gate_proj"], state[prefix + "up_proj"] = gate.contiguous(), up.contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    skeleton = load_skeleton(tmp_path)
    for name, tensor in skeleton.state_dict().items():
        assert tensor.is_meta == (".mlp.experts." in name), name
        if not tensor.is_meta:
            assert torch.equal(tensor, model.state_dict()[name]), name
    with CheckpointExperts(tmp_path, adapter_for(skeleton)) as experts:
        for layer, expert in _experts(adapter):
            assert torch.equal(experts.pack(layer, expert), adapter.pack_expert(layer, expert))


def test_sharded_checkpoint_and_a_dtype_override(tmp_path):
    model = tiny_model("mixtral", seed=5)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / checkpoint.INDEX_NAME).exists()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, experts_implementation="eager")
    skeleton = load_skeleton(tmp_path, torch.bfloat16)
    expected = reference.state_dict()
    for name, tensor in skeleton.state_dict().items():
        if not tensor.is_meta:
            assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    ref_adapter = adapter_for(reference)
    with CheckpointExperts(tmp_path, adapter_for(skeleton)) as experts:
        for layer, expert in _experts(ref_adapter):
            assert torch.equal(experts.pack(layer, expert), ref_adapter.pack_expert(layer, expert))


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    model = tiny_model("olmoe", seed=6)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers.1.mlp.experts" not in k}
    model.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointLayoutError, match="decoder layer 1"):
        CheckpointExperts(tmp_path, adapter_for(model))


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3"])
def test_engine_from_a_directory_never_loads_the_experts_and_is_exact(tmp_path, monkeypatch, family):
    tiny_model(family, seed=7).save_pretrained(tmp_path / "model")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model", experts_implementation="eager")
    tokens, logits, _, _ = greedy_decode(reference, PROMPT_IDS, 6, CPU, keep_logits=True)

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained would materialise every expert")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    skeleton = load_skeleton(tmp_path / "model")
    expert_params = [n for n, p in skeleton.named_parameters() if p.is_meta]
    assert expert_params and all(".mlp.experts." in n for n in expert_params)
    resident = sum(p.numel() for p in skeleton.parameters() if not p.is_meta)
    assert resident == sum(p.numel() for n, p in reference.named_parameters() if ".mlp.experts." not in n)

    top_k = adapter_for(reference).top_k
    config = EngineConfig(model=str(tmp_path / "model"), cache_slots=top_k, store_dir=str(tmp_path / "store"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the whole-model load
        engine = OffloadEngine(config)
    with engine:
        result = engine.generate(PROMPT_IDS, 6, keep_logits=True)
        assert not any(p.is_meta for p in engine.model.parameters())
    assert result.tokens == tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, result.logits, strict=True))


def test_copy_thread_runs_readers(tmp_path):
    adapter = adapter_for(tiny_model("olmoe"))
    store = DiskExpertStore.write(adapter, tmp_path / "experts.safetensors")
    engine = ThreadCopyEngine(LINKS["nvme"])
    slots = torch.zeros((2, adapter.shape.numel))
    tickets = [engine.submit(slots[i], lambda dst, e=i: store.read_into(1, e, dst)) for i in range(2)]
    engine.wait(tickets[-1])
    assert all(torch.equal(slots[i], adapter.pack_expert(1, i)) for i in range(2))
    assert tickets[0].nbytes == adapter.shape.nbytes
    engine.close()
    store.close()


def test_a_checkpoint_that_cannot_be_streamed_is_loaded_whole_with_a_warning(tmp_path, monkeypatch):
    import moe_env.engine as engine_module

    tiny_model("olmoe", seed=8).save_pretrained(tmp_path / "model")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model", experts_implementation="eager")
    tokens, _, _, _ = greedy_decode(reference, PROMPT_IDS, 4, CPU)

    def unknown_layout(*args, **kwargs):
        raise CheckpointLayoutError("an unknown expert layout")

    monkeypatch.setattr(engine_module, "load_skeleton", unknown_layout)
    config = EngineConfig(model=str(tmp_path / "model"), cache_slots=4, store_dir=str(tmp_path / "store"))
    with pytest.warns(UserWarning, match="unknown expert layout; loading the whole model"):
        engine = OffloadEngine(config)
    with engine:
        assert engine.generate(PROMPT_IDS, 4).tokens == tokens
