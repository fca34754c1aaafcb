"""Device tier: per-layer slot pools allocated once; ExpertCacheState (moe_env.cache) decides who sits where."""

from __future__ import annotations

import torch

from moe_env.models.base import ExpertShape


class SlotPools:
    """`capacity` packed-expert slots per MoE layer, one [capacity, numel] tensor per layer, never reallocated."""

    def __init__(self, shape: ExpertShape, num_layers: int, capacity: int, device: torch.device):
        self.shape = shape
        self.capacity = capacity
        self.device = device
        self._pools = [
            torch.zeros((capacity, shape.numel), dtype=shape.dtype, device=device) for _ in range(num_layers)
        ]
        # per-slot views, built once so the decode loop allocates nothing
        self._views = [[shape.unpack(pool[slot]) for slot in range(capacity)] for pool in self._pools]
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the zero fill must not race the first copies on the side stream

    @property
    def nbytes(self) -> int:
        return sum(pool.numel() * pool.element_size() for pool in self._pools)

    def buffer(self, layer: int, slot: int) -> torch.Tensor:
        """The flat slot buffer a copy writes into."""
        return self._pools[layer][slot]

    def weights(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) views of a slot."""
        return self._views[layer][slot]
