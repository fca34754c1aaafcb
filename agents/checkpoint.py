"""Policy-only checkpoints of the learned policies: one torch file, validated before anything is used.

Layout (``torch.save`` of a plain dict, read back with ``weights_only=True`` so a file cannot run code):
``format`` ("moe-env-policy"), ``version``, ``kind`` ("ppo" / "predictor"), ``model`` (name, num_layers,
num_experts, top_k), ``capacity``, ``obs_size``, ``config`` (the network's hyper-parameters, JSON-able) and
``state_dict``. An eviction scorer's config lists the ``decisions`` it was trained on (``trained_decisions``).
A shipped default sits next to a ``<name>.json`` with its training config and results.
"""

from __future__ import annotations

import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_env.atomic import atomic_write
from moe_env.errors import CheckpointError
from moe_env.policy import ModelSpec

FORMAT = "moe-env-policy"
VERSION = 1


@dataclass
class PolicyCheckpoint:
    kind: str
    model: dict[str, Any]
    capacity: int
    obs_size: int
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    def check_spec(self, spec: ModelSpec, where: str) -> None:
        """Refuse a model whose routing problem differs from the one the policy was trained on."""
        check_model(self.model, spec, where)


def check_model(trained: dict[str, Any], spec: ModelSpec, where: str) -> None:
    """A model's identity is its shape plus its name where both sides know it (never a log's file name): two logs
    of one model are compatible. Training scripts call this before training, so a run is never lost to it."""
    want = (trained["num_layers"], trained["num_experts"], trained["top_k"])
    have = (spec.num_layers, spec.num_experts, spec.top_k)
    if want != have:
        raise CheckpointError(
            f"{where}: trained for {trained.get('name') or 'a model'} with (layers, experts, top-k) = {want}, "
            f"but this model has {have}"
        )
    named, running = model_identity(trained.get("name", "")), model_identity(spec.name)
    if named and running and named != running:
        raise CheckpointError(f"{where}: trained for model {named!r}, not for {running!r}")


def model_identity(name: str) -> str:
    """The comparable form of a model name: a model directory's base name, lower-case ("" = unknown)."""
    return Path(str(name).rstrip("/")).name.lower() if name else ""


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return {"name": model_identity(spec.name), "num_layers": spec.num_layers, "num_experts": spec.num_experts,
            "top_k": spec.top_k}  # fmt: skip


def save_checkpoint(ckpt: PolicyCheckpoint, path: str | os.PathLike) -> Path:
    """Atomic write (a crash never leaves a half-written policy)."""
    path = Path(path)  # atomic_write makes the directory
    payload = {
        "format": FORMAT, "version": VERSION, "kind": ckpt.kind, "model": dict(ckpt.model),
        "capacity": int(ckpt.capacity), "obs_size": int(ckpt.obs_size), "config": dict(ckpt.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in ckpt.state_dict.items()},
    }  # fmt: skip
    with atomic_write(path, mode=0o644) as handle:  # a shipped policy must be readable by all
        torch.save(payload, handle)
    return path


def load_checkpoint(path: str | os.PathLike, kind: str) -> PolicyCheckpoint:
    """Read and validate the container; the network shapes are checked by the caller's load_state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such policy checkpoint: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip or pickle
        raise CheckpointError(f"{path}: not a readable policy checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a moe-env policy checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r}, this moe-env reads {VERSION}")
    if payload.get("kind") != kind:
        raise CheckpointError(f"{path}: a {payload.get('kind')!r} checkpoint, expected {kind!r}")
    try:
        model = payload["model"]
        ckpt = PolicyCheckpoint(
            kind=kind,
            model={
                "name": str(model.get("name", "")),
                "num_layers": int(model["num_layers"]),
                "num_experts": int(model["num_experts"]),
                "top_k": int(model["top_k"]),
            },
            capacity=int(payload["capacity"]),
            obs_size=int(payload["obs_size"]),
            config=dict(payload["config"]),
            state_dict=dict(payload["state_dict"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: incomplete policy checkpoint ({type(exc).__name__}: {exc})") from None
    if not all(isinstance(v, torch.Tensor) for v in ckpt.state_dict.values()):
        raise CheckpointError(f"{path}: the state dict holds non-tensors")
    if not all(bool(torch.isfinite(v).all()) for v in ckpt.state_dict.values() if v.is_floating_point()):
        raise CheckpointError(f"{path}: the weights hold NaN or inf")
    return ckpt


# the decisions an eviction scorer was trained on (config "decisions"): per-layer evictions (one layer's
# candidates) or a shared pool's (every layer's candidates at once, so its scores compare across layers); a
# checkpoint without the field predates shared pools: per-layer
PER_LAYER, SHARED = "per-layer", "shared"
DECISION_KINDS = (PER_LAYER, SHARED)


def trained_decisions(ckpt: PolicyCheckpoint, where: str) -> tuple[str, ...]:
    """The checkpoint's decision kinds; a corrupt field is refused (it decides whether a shared pool may run it)."""
    value = ckpt.config.get("decisions", [PER_LAYER])
    if (not isinstance(value, list) or not value or len(set(map(str, value))) != len(value)
            or not all(isinstance(v, str) and v in DECISION_KINDS for v in value)):  # fmt: skip
        raise CheckpointError(
            f"{where}: field 'decisions' is {reprlib.repr(value)}, expected a non-empty list of "
            f"{', '.join(DECISION_KINDS)} (a damaged checkpoint: retrain it or use another)"
        )
    return tuple(value)


def load_weights(module: torch.nn.Module, ckpt: PolicyCheckpoint, path: str | os.PathLike) -> None:
    try:
        module.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: weights do not fit the network ({first})") from None


def shipped_policy_path(kind: str, model: str = "tiny-mixtral") -> Path:
    """The default policy of `kind` shipped in the package (moe_env/assets/policies/<kind>-<model>.pt)."""
    import moe_env

    return Path(moe_env.__file__).resolve().parent / "assets" / "policies" / f"{kind}-{model}.pt"
