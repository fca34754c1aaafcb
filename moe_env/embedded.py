"""The small MoE models shipped inside the package (trained by ``train/pretrain.py``; see their train_meta.json)."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_MODELS = ("tiny-mixtral", "tiny-olmoe")
DEFAULT_MODEL = "tiny-mixtral"

_MODELS_ROOT = Path(__file__).resolve().parent / "assets" / "models"


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Directory of an embedded model (HF ``save_pretrained`` layout + tokenizer + train_meta.json)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    return _MODELS_ROOT / name
