"""Host tier: one packed contiguous buffer per (layer, expert), the source of every copy into the device cache.

- CUDA: page-locked (pinned) RAM, one [num_experts, numel] tensor per layer, so copies run on the copy engine
  asynchronously.
- CPU only: a safetensors file on disk (written once, atomically), read through a memory map one expert at a time,
  so the process's resident set holds the cache slots, not every expert.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from moe_env.errors import ModelError
from moe_env.models.base import ExpertShape, ModelAdapter


def _tensor_name(layer: int, expert: int) -> str:
    return f"layer{layer}.expert{expert}"


class HostExpertStore:
    """Read-only source of packed experts: `source(layer, expert)` is a CPU tensor of `shape.numel` elements."""

    def __init__(self, shape: ExpertShape, num_layers: int, num_experts: int):
        self.shape = shape
        self.num_layers = num_layers
        self.num_experts = num_experts

    @property
    def expert_bytes(self) -> int:
        return self.shape.nbytes

    def source(self, layer: int, expert: int) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        return None


class PinnedExpertStore(HostExpertStore):
    """Every expert in pinned host RAM (the CUDA path)."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__(adapter.shape, len(adapter.layers), adapter.num_experts)
        self._layers = []
        for layer in range(self.num_layers):
            buffer = torch.empty((self.num_experts, self.shape.numel), dtype=self.shape.dtype, pin_memory=True)
            for expert in range(self.num_experts):
                buffer[expert].copy_(adapter.pack_expert(layer, expert))
            self._layers.append(buffer)

    def source(self, layer: int, expert: int) -> torch.Tensor:
        return self._layers[layer][expert]


class DiskExpertStore(HostExpertStore):
    """Experts in one safetensors file, memory-mapped; each `source` is a zero-copy view of the mapped bytes."""

    def __init__(self, path: Path, shape: ExpertShape, num_layers: int, num_experts: int):
        super().__init__(shape, num_layers, num_experts)
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="c")  # "c": writable views, never written
        self._offsets = _read_offsets(self.path)
        expected = shape.nbytes
        for layer in range(num_layers):
            for expert in range(num_experts):
                begin, end = self._offsets.get(_tensor_name(layer, expert), (0, -1))
                if end - begin != expected:
                    raise ModelError(
                        f"expert store {self.path} does not match the model (layer {layer} expert {expert})"
                    )

    @classmethod
    def write(cls, adapter: ModelAdapter, path: Path) -> DiskExpertStore:
        """Pack every expert of `adapter`'s model into `path` (atomic: a temp file, then a rename)."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {
                _tensor_name(layer, expert): adapter.pack_expert(layer, expert)
                for layer in range(len(adapter.layers))
                for expert in range(adapter.num_experts)
            }
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".experts-", suffix=".tmp")
            os.close(fd)
            try:
                safetensors.torch.save_file(tensors, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return cls(path, adapter.shape, len(adapter.layers), adapter.num_experts)

    def source(self, layer: int, expert: int) -> torch.Tensor:
        begin, end = self._offsets[_tensor_name(layer, expert)]
        raw = torch.from_numpy(self._map[begin:end])  # a view of the mapped file: pages are read on copy
        return raw.view(self.shape.dtype)

    def close(self) -> None:
        mapping = getattr(self._map, "_mmap", None)
        self._map = None  # type: ignore[assignment]
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a view is still alive: unmapped when it is collected
                mapping.close()


def _read_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of each tensor of a safetensors file (8-byte header length, JSON header, data)."""
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    base = 8 + header_len
    return {
        name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }
