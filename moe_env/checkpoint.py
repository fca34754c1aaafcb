"""A Hugging Face MoE checkpoint read without ever holding all of its experts: the skeleton, then one expert at a time.

- ``load_skeleton(directory, dtype)``: the model with its experts on the meta device (shapes and dtype intact) and
  every other weight loaded from the checkpoint, keys renamed by transformers' own conversion mapping (e.g.
  Mixtral's ``block_sparse_moe`` -> ``mlp``) and cast to the dtype ``from_pretrained`` would give each parameter.
- ``CheckpointExperts(directory, adapter)``: ``pack(layer, expert)`` reads one expert's bytes from the safetensors
  files with ``pread`` and returns it packed as the store packs it (gate_up [2I, H] then down [H, I], flat). Both
  layouts are read: per-expert tensors as ``save_pretrained`` writes them (``experts.E.gate_proj/up_proj/down_proj``
  or Mixtral's ``w1/w3/w2``) and fused ones (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``,
  or ``gate_proj``/``up_proj [E, I, H]``), whose per-expert slices are contiguous byte ranges.
- ``read_header`` / ``pread_into``: the safetensors header and a read straight into a tensor's memory (no mmap:
  pages of a mapped file count in the process's RSS while mapped, and faulting 4 KB at a time is slow). The
  non-expert weights, which stay resident anyway, are read through safe_open's mapping, as from_pretrained does.
"""

from __future__ import annotations

import json
import os
import re
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moe_env.errors import ModelError
from moe_env.models.base import ModelAdapter

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


class CheckpointLayoutError(ModelError):
    """The checkpoint cannot be streamed (no safetensors file, or an expert layout this module does not know)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype, shape and its absolute byte range in the file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file (8-byte little-endian header length, JSON header, then the data)."""
    path = Path(path)
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointLayoutError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        tensors[name] = TensorInfo(path, DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, base + end)
    return tensors


def pread_into(fd: int, offset: int, dest: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor `dest` with the file's bytes from `offset`, with no intermediate buffer."""
    if dest.device.type != "cpu" or not dest.is_contiguous():
        raise ValueError("pread_into needs a contiguous CPU tensor")
    if dest.numel() == 0:
        return
    view = memoryview(dest.detach().reshape(-1).view(torch.uint8).numpy())
    total, done = len(view), 0
    while done < total:  # a read may return fewer bytes than asked (signals, 2 GiB per call on Linux)
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read: {done} of {total} bytes at offset {offset}")
        done += got


def checkpoint_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model directory's safetensors checkpoint (sharded with an index, or one file)."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointLayoutError(f"{directory} has no {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        tensors.update(read_header(directory / name))
    return tensors


# An expert tensor of decoder layer N, whatever the block is called (mlp, block_sparse_moe); `shared_experts` and
# `shared_expert` never match (the segment before the projection must be exactly `experts`).
_PER_EXPERT = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.[A-Za-z_]+\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.[A-Za-z_]+\.experts\.(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)$"
)
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def expert_key_layer(key: str) -> int | None:
    """The decoder layer of a checkpoint key that holds routed-expert weights, else None."""
    match = _PER_EXPERT.search(key) or _FUSED.search(key)
    return int(match["layer"]) if match else None


@dataclass(frozen=True)
class _Piece:
    """Bytes of one checkpoint range that land at element `dest` of the packed expert."""

    info: TensorInfo
    offset: int  # absolute file offset
    numel: int
    dest: int


class CheckpointExperts:
    """Reads packed experts one at a time from a model directory's safetensors files (see the module doc)."""

    def __init__(self, directory: Path, adapter: ModelAdapter, tensors: dict[str, TensorInfo] | None = None):
        self.directory = Path(directory)
        self.shape = adapter.shape
        self.num_experts = adapter.num_experts
        tensors = checkpoint_tensors(self.directory) if tensors is None else tensors
        per_layer: dict[int, dict[str, TensorInfo]] = {}
        for key, info in tensors.items():
            layer = expert_key_layer(key)
            if layer is not None:
                per_layer.setdefault(layer, {})[key] = info
        self._pieces = [
            self._layer_pieces(layer.decoder_index, per_layer.get(layer.decoder_index, {})) for layer in adapter.layers
        ]
        self._fds: dict[Path, int] = {}

    def _layer_pieces(self, decoder_index: int, keys: dict[str, TensorInfo]) -> list[list[_Piece]]:
        hidden, inter, experts = self.shape.hidden, self.shape.intermediate, self.num_experts
        where = f"{self.directory}: decoder layer {decoder_index}"
        per_expert: dict[int, dict[str, TensorInfo]] = {}
        fused: dict[str, TensorInfo] = {}
        for key, info in keys.items():
            match = _PER_EXPERT.search(key)
            if match:
                per_expert.setdefault(int(match["expert"]), {})[_ROLE[match["proj"]]] = info
            else:
                fused[_FUSED.search(key)["proj"]] = info
        # role -> (shape of one expert's tensor, element offset in the packed expert)
        layout = {
            "gate": ((inter, hidden), 0),
            "up": ((inter, hidden), inter * hidden),
            "down": ((hidden, inter), 2 * inter * hidden),
        }
        pieces: list[list[_Piece]] = []
        if per_expert and not fused:
            if sorted(per_expert) != list(range(experts)):
                raise CheckpointLayoutError(f"{where}: expert tensors for {len(per_expert)} of {experts} experts")
            for expert in range(experts):
                found = per_expert[expert]
                if set(found) != {"gate", "up", "down"}:
                    raise CheckpointLayoutError(f"{where} expert {expert}: has {sorted(found)}, wants gate, up, down")
                row = []
                for role, (shape, dest) in layout.items():
                    info = found[role]
                    if info.shape != shape:
                        raise CheckpointLayoutError(
                            f"{where} expert {expert} {role}: shape {info.shape}, wants {shape}"
                        )
                    row.append(_Piece(info, info.begin, shape[0] * shape[1], dest))
                pieces.append(row)
            return pieces
        if fused and not per_expert:
            parts: list[tuple[TensorInfo, tuple[int, int], int]] = []
            if set(fused) == {"gate_up_proj", "down_proj"}:
                parts = [(fused["gate_up_proj"], (2 * inter, hidden), 0), (fused["down_proj"], *layout["down"])]
            elif set(fused) == {"gate_proj", "up_proj", "down_proj"}:
                parts = [(fused[f"{role}_proj"], *layout[role]) for role in ("gate", "up", "down")]
            else:
                raise CheckpointLayoutError(f"{where}: fused expert tensors {sorted(fused)} are not a known layout")
            for info, shape, _ in parts:
                if info.shape != (experts, *shape):
                    raise CheckpointLayoutError(f"{where}: fused shape {info.shape}, wants {(experts, *shape)}")
            for expert in range(experts):
                row = []
                for info, shape, dest in parts:
                    numel = shape[0] * shape[1]
                    nbytes = numel * info.dtype.itemsize
                    row.append(_Piece(info, info.begin + expert * nbytes, numel, dest))  # dim 0 slices are contiguous
                pieces.append(row)
            return pieces
        raise CheckpointLayoutError(f"{where}: no expert tensors in a known layout (found {len(keys)} expert keys)")

    def read_into(self, layer: int, expert: int, dest: torch.Tensor) -> None:
        """Fill the flat packed `dest` ([numel], the model's expert dtype) with one expert from the checkpoint."""
        for piece in self._pieces[layer][expert]:
            target = dest[piece.dest : piece.dest + piece.numel]
            if piece.info.dtype == dest.dtype:
                pread_into(self._fd(piece.info.path), piece.offset, target)
            else:  # the model is loaded in another dtype: cast as from_pretrained does
                raw = torch.empty(piece.numel, dtype=piece.info.dtype)
                pread_into(self._fd(piece.info.path), piece.offset, raw)
                target.copy_(raw)

    def pack(self, layer: int, expert: int) -> torch.Tensor:
        dest = torch.empty(self.shape.numel, dtype=self.shape.dtype)
        self.read_into(layer, expert, dest)
        return dest

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointExperts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_skeleton(directory: Path, dtype: torch.dtype | None = None):
    """The model of `directory` with its routed experts on the meta device and every other weight loaded.

    `dtype` None: the config's dtype (``from_pretrained(dtype="auto")``). The model is built on the meta device
    (torch's device context, no accelerate), the checkpoint's tensors are assigned and the other buffers computed.
    Raises CheckpointLayoutError when the checkpoint needs a conversion other than renaming for a non-expert weight
    (then only ``from_pretrained`` can load it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    directory = Path(directory)
    tensors = checkpoint_tensors(directory)
    config = AutoConfig.from_pretrained(directory)
    config._experts_implementation = "eager"
    if dtype is None:
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype), None)
        if not isinstance(dtype, torch.dtype):
            dtype = next((i.dtype for i in tensors.values() if i.dtype.is_floating_point), torch.float32)
    with torch.device("meta"):  # as from_pretrained: nothing allocated, no weight initialisation run
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = model.state_dict()  # everything on meta, with from_pretrained's dtypes
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = model.base_model_prefix
    loaded: dict[str, torch.Tensor] = {}
    handles: dict[Path, Any] = {}
    with ExitStack() as stack:
        for key, info in tensors.items():
            if expert_key_layer(key) is not None:
                continue
            name, converter = rename_source_key(key, renamings, converters, prefix, expected)
            if name not in expected and key in expected:  # as from_pretrained: a key that needed no renaming
                name, converter = rename_source_key(key, [], [], prefix, expected)
            if name not in expected:
                continue  # an unexpected key: from_pretrained ignores it too
            if converter is not None:
                raise CheckpointLayoutError(f"{directory}: weight {key} needs a conversion ({converter})")
            if info.path not in handles:
                handles[info.path] = stack.enter_context(safe_open(str(info.path), "pt"))
            # safe_open's tensors view the mapped file, as from_pretrained's do: same values AND same addresses
            # modulo 64, which matters because CPU matrix-vector kernels sum in an alignment-dependent order
            tensor = handles[info.path].get_tensor(key)
            target = expected[name]
            loaded[name] = tensor if tensor.dtype == target.dtype else tensor.to(target.dtype)
    model.load_state_dict(loaded, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _compute_buffers(model)
    from moe_env.models import adapter_for

    experts = {id(p) for layer in adapter_for(model).layers for p in layer.experts.parameters()}
    missing = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in experts]
    if missing:
        raise CheckpointLayoutError(f"{directory}: the checkpoint lacks {missing[:4]}")
    return model.eval()


def _compute_buffers(model) -> None:
    """Give the buffers the checkpoint did not hold (rotary frequencies) their values, as from_pretrained does.

    from_pretrained materialises them on the CPU and runs the model's weight initialisation, which computes them
    and skips every tensor flagged ``_is_hf_initialized`` (transformers.initialization); everything loaded is so
    flagged, and the experts stay on meta, where initialisation allocates nothing.
    """
    for tensor in model.state_dict(keep_vars=True).values():
        if not tensor.is_meta:
            tensor._is_hf_initialized = True
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_meta:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, torch.empty_like(buffer, device="cpu"), persistent=persistent)
    model.initialize_weights()
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if left:
        raise CheckpointLayoutError(f"buffers {left[:4]} are still on the meta device after initialisation")
