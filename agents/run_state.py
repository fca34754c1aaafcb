"""Resume state of a training run: the imitation decision pool, and the latest numbered checkpoint of a run
directory (imitation rounds, predictor epochs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from moe_env.agents.checkpoint import load_checkpoint, load_weights
from moe_env.agents.set_scorer import Decisions, SetScorerNet

from moe_env.atomic import atomic_write
from moe_env.errors import CheckpointError

KIND = "imitation"


def save_pool(run_dir: Path, pool: Decisions) -> Path:
    """Atomic: a crash mid-write leaves the previous pool."""
    path = run_dir / "pool.npz"
    distance = pool.distance if pool.distance is not None else np.full(len(pool.rows), np.inf, np.float32)
    with atomic_write(path, mode=0o600) as handle:  # the run's own resume state, private as before
        np.savez(handle, rows=pool.rows, target=pool.target, offsets=pool.offsets, distance=distance)
    return path


def load_pool(run_dir: Path) -> Decisions:
    path = run_dir / "pool.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            pool = Decisions(data["rows"], data["target"], data["offsets"], data["distance"])
    except Exception as exc:  # missing or damaged
        raise CheckpointError(f"{path}: cannot resume from the decision pool ({type(exc).__name__})") from None
    if len(pool.target) != len(pool.rows) or pool.offsets[-1] != len(pool.rows):
        raise CheckpointError(f"{path}: inconsistent decision pool")
    return pool


def load_round(run_dir: Path) -> tuple[int, SetScorerNet | None, list[dict]]:
    """(next round to run, the last round's scorer, the rounds' history) of an imitation run directory."""
    return load_latest(run_dir, "round", KIND)


def load_latest(run_dir: Path, counter: str, kind: str, width: int | None = None
                ) -> tuple[int, SetScorerNet | None, list[dict]]:  # fmt: skip
    """(next index, the network of the highest-numbered `<counter>-N.pt`, the run's history) of a run directory;
    (0, None, []) when it holds none. `width`: the network's input width (default: the checkpoint's)."""
    paths = sorted(run_dir.glob(f"{counter}-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if not paths:
        return 0, None, []
    ckpt = load_checkpoint(paths[-1], kind)
    net = SetScorerNet(ckpt.obs_size if width is None else width, int(ckpt.config.get("hidden", 32)))
    load_weights(net, ckpt, paths[-1])
    return int(ckpt.config[counter]) + 1, net.eval(), list(ckpt.config.get("history", []))
