"""Device tier: slot pools allocated once, laid out as the cache's Allocation says (one tensor per pool: per layer,
or one shared by every layer), plus a few scratch slots for prefill experts that bypass the cache.
ExpertCacheState (moe_env.cache) decides who sits where."""

from __future__ import annotations

import torch

from moe_env.allocation import Allocation
from moe_env.models.base import ExpertShape


class SlotPools:
    """One [slots, numel] tensor per pool of `allocation` and `scratch` bypass slots, never reallocated.

    An int `allocation` is that many slots in each of `num_layers` layers (uniform)."""

    def __init__(
        self,
        shape: ExpertShape,
        num_layers: int,
        allocation: int | Allocation,
        device: torch.device,
        scratch: int = 0,
    ):
        if not isinstance(allocation, Allocation):
            allocation = Allocation.uniform(num_layers, max(allocation, 1), allocation)
        self.shape = shape
        self.allocation = allocation
        self.capacity = max(allocation.pool_slots)
        self.device = device
        self._layer_pool = allocation.layer_pool
        self._pools = [
            torch.zeros((size, shape.numel), dtype=shape.dtype, device=device) for size in allocation.pool_slots
        ]
        self._scratch = torch.zeros((scratch, shape.numel), dtype=shape.dtype, device=device)
        # per-slot views, built once so the decode loop allocates nothing
        self._views = [[shape.unpack(pool[slot]) for slot in range(pool.shape[0])] for pool in self._pools]
        self._scratch_views = [shape.unpack(self._scratch[i]) for i in range(scratch)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the zero fill must not race the first copies on the side stream

    @property
    def nbytes(self) -> int:
        """Device bytes of every slot, scratch included."""
        return sum(t.numel() * t.element_size() for t in (*self._pools, self._scratch))

    @property
    def scratch_slots(self) -> int:
        return self._scratch.shape[0]

    def buffer(self, layer: int, slot: int) -> torch.Tensor:
        """The flat slot buffer a copy writes into (`slot` of the layer's pool)."""
        return self._pools[self._layer_pool[layer]][slot]

    def weights(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) views of a slot."""
        return self._views[self._layer_pool[layer]][slot]

    def scratch_buffer(self, index: int) -> torch.Tensor:
        return self._scratch[index]

    def scratch_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._scratch_views[index]
