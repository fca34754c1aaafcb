"""The CPU store's memory and read path on olmoe-shapes (bench/peers.py's prepared model): the numbers behind
docs/performance.md's *After the store fixes*. Prints JSON lines.

    .venv/bin/python bench/store_memory.py load        # lifetime peak RSS of OffloadEngine(model=DIR), fresh processes
    .venv/bin/python bench/store_memory.py breakdown   # RSS by part at 0.5x (imports, skeleton, slots, decoding)
    .venv/bin/python bench/store_memory.py ab          # decode with the store's preadv vs a memory-mapped copy

Every mode drops the store's pages before each forward (as bench/peers.py does), so expert reads hit the disk.
"""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from moe_env import peers
from moe_env.store_cache import cache_root

ROOT = cache_root() / "peers"  # bench/peers.py's prepared models (not store entries: never pruned)
SLOTS = 32  # 0.5x of 64 experts
PROMPT = list(range(100, 116))


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) // 1024
    return out


def load_one(model_dir: str, store_dir: str) -> None:
    """(In a fresh process.) Construct the engine from the directory, then generate 4 tokens."""
    torch.set_num_threads(1)
    from moe_env.engine import EngineConfig, OffloadEngine

    start = time.perf_counter()
    engine = OffloadEngine(EngineConfig(model=model_dir, cache_slots=SLOTS, store_dir=store_dir))
    row = {"build_s": round(time.perf_counter() - start, 1), "after_build": status()}
    row["tokens"] = engine.generate(PROMPT, 4).tokens
    row["after_generate"] = status()
    print(json.dumps(row))


def load() -> None:
    prepared = peers.prepare_model_dir(peers.OLMOE_SHAPES, ROOT)
    with tempfile.TemporaryDirectory(prefix="store-memory-") as empty:
        for case, store_dir in (("store cached", prepared), ("store built", empty)):
            cmd = [sys.executable, __file__, "load-one", str(prepared), str(store_dir)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(json.dumps({"case": case, **json.loads(out)}))


def engine_at_half():
    from moe_env.engine import EngineConfig, OffloadEngine

    prepared = peers.prepare_model_dir(peers.OLMOE_SHAPES, ROOT)
    model = peers.load_skeleton(prepared)
    skeleton = status()
    engine = OffloadEngine.from_model(model, EngineConfig(cache_slots=SLOTS, store_dir=str(prepared)))
    return engine, skeleton, peers.SlowTier([engine.runtime.store.path])


def breakdown() -> None:
    torch.set_num_threads(1)
    rows = {"imports": status()}
    engine, rows["skeleton"], tier = engine_at_half()
    rows["slots allocated"] = status()
    engine.generate(PROMPT, 3, on_step=tier.drop)
    rows["after warm-up"] = status()
    peak: dict[str, int] = {}

    def sample(*_: object) -> None:
        tier.drop()
        for key, value in status().items():
            peak[key] = max(peak.get(key, 0), value)

    for _ in range(3):
        engine.generate(PROMPT, 12, on_step=sample)
    rows["max before any forward of 3 runs"] = peak
    rows["slots_MiB"] = engine.runtime.pools.nbytes >> 20
    rows["non_expert_MiB"] = sum(p.numel() * p.element_size() for p in engine.model.parameters()) >> 20
    print(json.dumps(rows))


def ab(rounds: int = 3) -> None:
    """Same engine, same drops, the read path alternated: the store's preadv vs the former mapped copy."""
    torch.set_num_threads(1)
    engine, _, tier = engine_at_half()
    store = engine.runtime.store
    pread = store.read_into
    mapped = np.memmap(store.path, dtype=np.uint8, mode="c")

    def mapped_copy(layer: int, expert: int, dest: torch.Tensor) -> None:
        begin = store._offsets[layer][expert]
        dest.copy_(torch.from_numpy(mapped[begin : begin + store.shape.nbytes]).view(store.shape.dtype))

    def drop(*_: object) -> None:
        mapped._mmap.madvise(mmap.MADV_DONTNEED)  # mapped pages survive fadvise
        tier.drop()

    engine.generate(PROMPT, 3, on_step=drop)
    for _ in range(rounds):
        for name, read in (("preadv", pread), ("mmap", mapped_copy)):
            store.read_into = read
            m = engine.generate(PROMPT, 12, on_step=drop).metrics
            print(json.dumps({"read": name, "tokens_per_s": round(m.tokens_per_s, 2), "ttft_s": round(m.ttft_s, 3),
                              "stall_s": round(m.stall_s, 3), "copy_gb_s": round(m.bytes_moved / m.copy_s / 1e9, 3)}),
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "load-one":
        load_one(sys.argv[2], sys.argv[3])
    elif mode in ("load", "breakdown", "ab"):
        globals()[mode]()
    elif mode in ("-h", "--help"):
        print(f"usage: {__doc__}")
    else:
        sys.exit(__doc__)
