"""Host tier: one packed contiguous buffer per (layer, expert), the source of every copy into the device cache.

- CUDA: page-locked (pinned) RAM, one [num_experts, numel] tensor per layer, so copies run on the copy engine
  asynchronously.
- CPU only: a safetensors file on disk (written once, atomically, one expert at a time), read with ``pread``
  straight into the destination slot (`read_into`): nothing is mapped, so the process's resident set holds the
  cache slots, not the file's pages, and a cold expert costs one large read instead of thousands of page faults.

The experts come from a `pack(layer, expert)` callable: the adapter's (an in-memory model) or a
moe_env.checkpoint.CheckpointExperts' (read from the model's files), so building a store never needs every expert
in RAM at once.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from moe_env.atomic import atomic_write
from moe_env.checkpoint import DTYPE_CODES, pread_into, read_header
from moe_env.errors import ModelError
from moe_env.models.base import ExpertShape, ModelAdapter

Packer = Callable[[int, int], torch.Tensor]  # (layer, expert) -> the packed expert, flat, contiguous, on the CPU


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

    def read_into(self, layer: int, expert: int, dest: torch.Tensor) -> None:
        """Copy one packed expert into `dest` (a flat tensor of `shape.numel` elements)."""
        dest.copy_(self.source(layer, expert))

    def close(self) -> None:
        return None


class PinnedExpertStore(HostExpertStore):
    """Every expert in pinned host RAM (the CUDA path)."""

    def __init__(self, adapter: ModelAdapter, pack: Packer | None = None):
        super().__init__(adapter.shape, len(adapter.layers), adapter.num_experts)
        pack = adapter.pack_expert if pack is None else pack
        self._layers = []
        for layer in range(self.num_layers):
            buffer = torch.empty((self.num_experts, self.shape.numel), dtype=self.shape.dtype, pin_memory=True)
            for expert in range(self.num_experts):
                buffer[expert].copy_(pack(layer, expert))
            self._layers.append(buffer)

    def source(self, layer: int, expert: int) -> torch.Tensor:
        return self._layers[layer][expert]


class DiskExpertStore(HostExpertStore):
    """Experts in one safetensors file; `read_into` preads an expert's bytes straight into a CPU tensor."""

    def __init__(self, path: Path, shape: ExpertShape, num_layers: int, num_experts: int):
        super().__init__(shape, num_layers, num_experts)
        self.path = Path(path)
        tensors = read_header(self.path)
        self._offsets: list[list[int]] = []
        for layer in range(num_layers):
            row = []
            for expert in range(num_experts):
                info = tensors.get(_tensor_name(layer, expert))
                if info is None or info.end - info.begin != shape.nbytes or info.dtype != shape.dtype:
                    raise ModelError(
                        f"expert store {self.path} does not match the model (layer {layer} expert {expert})"
                    )
                row.append(info.begin)
            self._offsets.append(row)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    @classmethod
    def write(cls, adapter: ModelAdapter, path: Path, pack: Packer | None = None) -> DiskExpertStore:
        """Pack every expert into `path` unless it exists (atomic: a temp file, then a rename).

        `pack` (default: the adapter's, from the in-memory model) is called once per expert and its result written
        at once, so the writer holds one expert at a time.
        """
        path = Path(path)
        if not path.exists():
            with atomic_write(path) as handle:
                _write_safetensors(handle, adapter.shape, len(adapter.layers), adapter.num_experts,
                                   adapter.pack_expert if pack is None else pack)  # fmt: skip
        return cls(path, adapter.shape, len(adapter.layers), adapter.num_experts)

    def read_into(self, layer: int, expert: int, dest: torch.Tensor) -> None:
        if dest.numel() != self.shape.numel or dest.dtype != self.shape.dtype:
            raise ValueError(f"destination of {dest.numel()} {dest.dtype} for an expert of {self.shape}")
        if self._fd is None:
            raise ValueError(f"expert store {self.path} is closed")
        pread_into(self._fd, self._offsets[layer][expert], dest)

    def source(self, layer: int, expert: int) -> torch.Tensor:
        """A fresh tensor holding the expert (the copy path uses `read_into` into the slot instead)."""
        dest = torch.empty(self.shape.numel, dtype=self.shape.dtype)
        self.read_into(layer, expert, dest)
        return dest

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_safetensors(handle, shape: ExpertShape, num_layers: int, num_experts: int, pack: Packer) -> None:
    """A safetensors file of flat tensors `layer{l}.expert{e}`, written in order one expert at a time."""
    nbytes, code = shape.nbytes, DTYPE_CODES[shape.dtype]
    names = [_tensor_name(layer, expert) for layer in range(num_layers) for expert in range(num_experts)]
    header = {
        name: {"dtype": code, "shape": [shape.numel], "data_offsets": [i * nbytes, (i + 1) * nbytes]}
        for i, name in enumerate(names)
    }
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    handle.write(struct.pack("<Q", len(blob)))
    handle.write(blob)
    for layer in range(num_layers):
        for expert in range(num_experts):
            packed = pack(layer, expert)
            if packed.numel() != shape.numel or packed.dtype != shape.dtype:
                raise ModelError(f"expert {layer}/{expert}: packed {packed.numel()} {packed.dtype}, wants {shape}")
            handle.write(memoryview(packed.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
