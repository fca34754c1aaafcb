"""What users run instead of moe-env, measured with the same greedy loop: the pieces of bench/peers.py worth reusing.

- ``olmoe_shapes_config`` / ``prepare_model_dir``: a random-weight model with REAL OLMoE-1B-7B layer shapes (hidden
  2048, 64 experts of intermediate 1024, top-8, 16 heads, bf16: 12.58 MB per expert), fewer layers and a small
  vocabulary, saved once as a Hugging Face directory, with moe-env's packed expert store and a file of the
  non-expert weights beside it.
- ``load_skeleton``: the model with its experts left on the meta device (non-expert weights only; the engine's own
  loader, moe_env.checkpoint.load_skeleton, on the source directory): the process never holds every expert at once.
- ``accelerate_model``: transformers + accelerate offloading as accelerate's docs recommend (``device_map`` from
  ``infer_auto_device_map`` under a ``max_memory`` budget, the rest to ``"disk"`` with an ``offload_folder``).
- ``StaticPlacement``: llama.cpp-style static placement (``--n-cpu-moe``/override-tensor idea) as its own small
  executor: the most-used experts of each layer pinned in RAM for good, every other routed expert read from the
  slow tier into a scratch buffer at each use and forgotten (no cache, no policy).
- ``SlowTier``: emulates a machine whose RAM beyond the budget is not there to cache the slow tier: before each
  forward, the files' page cache is dropped (posix_fadvise DONTNEED), so every read of an expert outside the budget
  is a real disk read (the expert store maps nothing, so no mapping keeps its pages alive).
- ``ProcessMemory`` / ``read_bytes``: the resident-set high-water mark (VmHWM, resettable through clear_refs) and
  the bytes this process read from storage (/proc/self/io).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moe_env import checkpoint
from moe_env.models import adapter_for
from moe_env.models.base import ModelAdapter
from moe_env.store import DiskExpertStore, HostExpertStore

OLMOE_SHAPES = "olmoe-shapes"
STORE_FILE = "experts.safetensors"  # moe-env's packed expert store, beside the model's own files
DENSE_FILE = "dense.safetensors"  # the non-expert weights under the in-memory parameter names


# -- the model ------------------------------------------------------------------------------------------------
def olmoe_shapes_config(num_layers: int = 4, vocab_size: int = 4096):
    """allenai/OLMoE-1B-7B-0924's layer shapes (hidden 2048, 64 experts, intermediate 1024, top-8, 16 heads of
    128, rope theta 10000, qk-norm), `num_layers` of its 16 layers and a `vocab_size` vocabulary (50304 real)."""
    return AutoConfig.for_model(
        "olmoe",
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        norm_topk_prob=False,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        dtype="bfloat16",
    )


def is_expert_key(name: str) -> bool:
    return ".mlp.experts." in name


def prepare_model_dir(model: str, root: Path, num_layers: int = 4, vocab_size: int = 4096, seed: int = 0) -> Path:
    """A model directory with moe-env's expert store (STORE_FILE) and the non-expert weights (DENSE_FILE) beside it.

    `model` is ``olmoe-shapes`` (built from config with random weights, once, under `root`), an embedded model's
    name or a local Hugging Face directory (copied by reference: the extra files go to `root`/<name>).
    """
    if model == OLMOE_SHAPES:
        directory = root / f"olmoe-shapes-L{num_layers}-V{vocab_size}-s{seed}"
        source = directory
    else:
        from moe_env.engine import resolve_model_dir

        source = resolve_model_dir(model)
        key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]
        directory = root / f"{source.name}-{key}"
    if (directory / STORE_FILE).exists() and (directory / DENSE_FILE).exists() and (directory / "source").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    if model == OLMOE_SHAPES:
        config = olmoe_shapes_config(num_layers, vocab_size)
        config._experts_implementation = "eager"
        torch.manual_seed(seed)
        built = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        built.save_pretrained(directory)
        del built
    # the skeleton and one expert at a time: preparing never holds the whole model either
    skeleton = checkpoint.load_skeleton(source)
    adapter = adapter_for(skeleton)
    with checkpoint.CheckpointExperts(source, adapter) as experts:
        DiskExpertStore.write(adapter, directory / STORE_FILE, experts.pack).close()
    # clones: tied weights (embeddings and head) share memory, which safetensors refuses
    dense = {k: v.contiguous().clone() for k, v in skeleton.state_dict().items() if not is_expert_key(k)}
    save_file(dense, str(directory / DENSE_FILE))
    (directory / "source").write_text(str(source.resolve()))
    return directory


def source_dir(prepared: Path) -> Path:
    """The Hugging Face directory the prepared files were made from."""
    return Path((prepared / "source").read_text().strip())


def model_shape(prepared: Path) -> dict:
    """Layer shape of a model directory, as the output states it."""
    config = json.loads((source_dir(prepared) / "config.json").read_text())
    num_experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
    intermediate = config.get("moe_intermediate_size") or config["intermediate_size"]
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    elem = 2 if dtype in ("bfloat16", "float16") else 4
    return {
        "model_type": config["model_type"],
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "experts": num_experts,
        "top_k": config["num_experts_per_tok"],
        "expert_intermediate": intermediate,
        "vocab": config["vocab_size"],
        "dtype": dtype,
        "expert_bytes": 3 * config["hidden_size"] * intermediate * elem,
    }


def load_skeleton(prepared: Path) -> PreTrainedModel:
    """The prepared model with experts on the meta device (their shapes and dtype intact), every other weight loaded."""
    return checkpoint.load_skeleton(source_dir(prepared))


def non_expert_bytes(prepared: Path) -> int:
    """Bytes of every weight but the experts (the dense file's size; its JSON header is a few KB)."""
    return (prepared / DENSE_FILE).stat().st_size


def accelerate_model(prepared: Path, cpu_budget_bytes: int, offload_folder: Path) -> tuple[PreTrainedModel, dict]:
    """transformers + accelerate disk offload under a RAM budget (the documented recipe)."""
    from accelerate import infer_auto_device_map, init_empty_weights

    source = source_dir(prepared)
    config = AutoConfig.from_pretrained(source)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=config.dtype or torch.float32)
    device_map = infer_auto_device_map(
        empty,
        max_memory={"cpu": int(cpu_budget_bytes), "disk": 1 << 50},
        no_split_module_classes=list(empty._no_split_modules or []),
        dtype=config.dtype,
    )
    del empty
    device_map = dict(device_map)
    if getattr(config, "tie_word_embeddings", False) and "lm_head" in device_map:
        # tied head and embeddings must live together: a head sent to disk is looked up under its own name in the
        # offload index, where the tied weight is not saved (KeyError 'lm_head.weight' at the first forward)
        device_map["lm_head"] = device_map.get("model.embed_tokens", device_map["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype="auto",
        device_map=dict(device_map),
        offload_folder=str(offload_folder),
        experts_implementation="eager",
    )
    return model.eval(), dict(device_map)


# -- static placement --------------------------------------------------------------------------------------------
class StaticExperts(nn.Module):
    """A MoE block's experts: `pinned` experts in RAM for good; any other routed expert is copied from the store into
    a scratch buffer at each use (no cache). Computes exactly as the family's eager Experts.forward."""

    def __init__(self, owner: StaticPlacement, layer: int, act_fn: nn.Module):
        super().__init__()
        self.owner = owner
        self.layer = layer
        self.act_fn = act_fn

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        owner = self.owner
        num_experts = owner.num_experts
        final = torch.zeros_like(hidden)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            if expert == num_experts:
                continue
            owner.usage[self.layer][expert] += 1
            gate_up_proj, down_proj = owner.weights(self.layer, expert)
            top_k_pos, token_idx = torch.where(mask[expert])
            current = hidden[token_idx]
            gate, up = nn.functional.linear(current, gate_up_proj).chunk(2, dim=-1)
            current = self.act_fn(gate) * up
            current = nn.functional.linear(current, down_proj)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final


class StaticPlacement:
    """Patch `model` (experts on meta or not) so that experts are served from `store` with a static pinned set."""

    def __init__(self, model: PreTrainedModel, store: HostExpertStore, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.adapter: ModelAdapter = adapter_for(model)
        self.store = store
        self.shape = self.adapter.shape
        self.num_experts = self.adapter.num_experts
        num_layers = len(self.adapter.layers)
        self.usage = [[0] * self.num_experts for _ in range(num_layers)]
        self.bytes_read = 0
        self._pinned: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(num_layers)]
        self._pinned_buffers: list[torch.Tensor] = []
        self._scratch = torch.empty(self.shape.numel, dtype=self.shape.dtype, device=self.device)
        self._scratch_views = self.shape.unpack(self._scratch)
        for layer in self.adapter.layers:
            module = StaticExperts(self, layer.index, layer.experts.act_fn)
            layer.block.experts = module
            layer.experts = module

    def pin(self, per_layer: int) -> list[list[int]]:
        """Pin the `per_layer` most-used experts of each layer (by the usage counted so far; ties: lowest id)."""
        chosen = []
        self._pinned_buffers = []
        for layer, counts in enumerate(self.usage):
            order = sorted(range(self.num_experts), key=lambda e: (-counts[e], e))[:per_layer]
            buffer = torch.empty((len(order), self.shape.numel), dtype=self.shape.dtype, device=self.device)
            self._pinned[layer] = {}
            for i, expert in enumerate(sorted(order)):
                self.store.read_into(layer, expert, buffer[i])
                self._pinned[layer][expert] = self.shape.unpack(buffer[i])
            self._pinned_buffers.append(buffer)
            chosen.append(sorted(order))
        self.usage = [[0] * self.num_experts for _ in self.usage]
        return chosen

    @property
    def pinned_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._pinned_buffers) + self.shape.nbytes

    def weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        pinned = self._pinned[layer].get(expert)
        if pinned is not None:
            return pinned
        self.store.read_into(layer, expert, self._scratch)  # the disk store's pread, as the engine's copies
        self.bytes_read += self.shape.nbytes
        return self._scratch_views


# -- the slow tier and the process's memory ----------------------------------------------------------------------
class SlowTier:
    """The files an offloaded configuration reads experts from; `drop()` makes the next reads real disk reads."""

    def __init__(self, files: Iterable[Path]):
        self.files = sorted({Path(f) for f in files if Path(f).is_file()})

    def drop(self, *_: object) -> None:
        for path in self.files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class ProcessMemory:
    """Resident-set high-water mark of this process since `reset()` (VmHWM; reset by writing 5 to clear_refs)."""

    def __init__(self) -> None:
        self.resettable = True

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False

    def peak_bytes(self) -> int:
        return _status_kb("VmHWM") * 1024

    @staticmethod
    def rss_bytes() -> int:
        return _status_kb("VmRSS") * 1024

    @staticmethod
    def lifetime_peak_bytes() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_bytes() -> int:
    """Bytes this process (all threads) caused to be fetched from storage."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
