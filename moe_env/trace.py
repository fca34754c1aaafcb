"""Expert activation traces: the in-memory form (this part is the contract between engine, sim, env, analysis).

A ``Trace`` holds ``TraceMeta`` and a list of ``SequenceTrace``. Per sequence, decode arrays are indexed
[step, layer, ...]; prefill arrays [prompt_token, layer, ...]. A cell whose experts are all -1 is absent (the
source dropped it; replay skips it). Absent signals (full gate logits, lookahead logits) are None, never invented.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_env.routing import LayerRouting

TRACE_FORMAT_VERSION = 1


@dataclass
class TraceMeta:
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    source: str  # "record" (moe-env record) or "convert:<format>"
    config_hash: str = ""
    expert_bytes: int = 0  # bytes of one expert as recorded (0: unknown)
    version: int = TRACE_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SequenceTrace:
    """One sequence. Shapes: experts [T, L, k] int16; weights [T, L, k] float32; logits [T, L, E] float32."""

    experts: np.ndarray
    weights: np.ndarray | None = None
    gate_logits: np.ndarray | None = None
    lookahead_logits: np.ndarray | None = None  # last layer's row is NaN (there is no next layer)
    prefill_experts: np.ndarray | None = None  # [P, L, k]
    prefill_weights: np.ndarray | None = None
    prompt_ids: np.ndarray | None = None  # [P] int32
    output_ids: np.ndarray | None = None  # [T + 1] int32: the generated tokens
    prompt_id: str = ""  # name of the prompt in its prompt set
    split: str = ""  # "train" / "eval" / ""

    @property
    def num_steps(self) -> int:
        return int(self.experts.shape[0])

    def routings(self) -> Iterator[LayerRouting]:
        """LayerRoutings in the order a decode loop produces them: prefill layer by layer, then step by step."""
        num_layers = self.experts.shape[1]
        if self.prefill_experts is not None and len(self.prefill_experts):
            for layer in range(num_layers):
                yield LayerRouting(
                    layer=layer,
                    step=-1,
                    experts=self.prefill_experts[:, layer],
                    weights=None if self.prefill_weights is None else self.prefill_weights[:, layer],
                )
        for step in range(self.num_steps):
            for layer in range(num_layers):
                experts = self.experts[step, layer]
                if experts[0] < 0:
                    continue  # absent cell
                yield LayerRouting(
                    layer=layer,
                    step=step,
                    experts=experts[None, :],
                    weights=None if self.weights is None else self.weights[step, layer][None, :],
                    gate_logits=None if self.gate_logits is None else self.gate_logits[step, layer][None, :],
                    lookahead_logits=(
                        None
                        if self.lookahead_logits is None or layer + 1 >= num_layers
                        else self.lookahead_logits[step, layer][None, :]
                    ),
                )


@dataclass
class Trace:
    meta: TraceMeta
    sequences: list[SequenceTrace]

    def split(self, name: str) -> Trace:
        """The sequences of one split ("train"/"eval"); all of them for ""."""
        if not name:
            return self
        return Trace(self.meta, [s for s in self.sequences if s.split == name])

    @property
    def num_accesses(self) -> int:
        return int(sum((s.experts[:, :, 0] >= 0).sum() * self.meta.top_k for s in self.sequences))
