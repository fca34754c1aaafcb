"""Resume state of an imitation run: the decision pool and the latest round's scorer, in the run directory."""

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
    """(next round to run, the last round's scorer, the rounds' history) of a run directory."""
    rounds = sorted(run_dir.glob("round-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if not rounds:
        return 0, None, []
    ckpt = load_checkpoint(rounds[-1], KIND)
    net = SetScorerNet(ckpt.obs_size, int(ckpt.config.get("hidden", 32)))
    load_weights(net, ckpt, rounds[-1])
    return int(ckpt.config["round"]) + 1, net.eval(), list(ckpt.config.get("history", []))
