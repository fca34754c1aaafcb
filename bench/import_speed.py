"""Import speed of routing logs in MB/s: the Mixtral JSONL log replicated to ~100+ MB and the DSV2-Lite CSVs.

    python bench/import_speed.py [--copies 100] [--repeat 3] [--shared ../shared/traces]

Rows (medians of --repeat runs, one process, same files; wall time and the process's CPU time, all threads: on a
machine shared with other jobs the wall rate is what they left, MB per CPU-second what the code costs):
`import_jsonl_routing` (pyarrow JSON reader in blocks on threads, the path every command takes), the line-by-line
reader it falls back to on malformed input (the reference: what the importer did before), and
`import_csv_routing` on the dsv2lite-puffin directory. The replicated log is written to
a temporary directory (each copy's problem ids renamed, so the copies are separate sequences) and removed after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from moe_env.trace_csv import import_csv_routing
from moe_env.trace_jsonl import _read_slow, import_jsonl_routing

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


def replicate(log: Path, copies: int, out: Path) -> int:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    with out.open("w") as handle:
        for copy in range(copies):
            for record in lines:
                handle.write(json.dumps(record | {"problem_id": f"{copy}-{record['problem_id']}"}) + "\n")
    return out.stat().st_size


def median_seconds(run: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of the process: every thread's, so parallel reads add up)."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=100, help="copies of the Mixtral log (1.1 MB each)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared traces directory")
    args = parser.parse_args()
    log, csv_dir = args.shared / "mixtral-8x7b-gsm8k-routing.jsonl", args.shared / "dsv2lite-puffin"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "mixtral-replicated.jsonl"
        size = replicate(log, args.copies, big)
        for name, run in (
            ("jsonl: import_jsonl_routing (pyarrow)", lambda: import_jsonl_routing(big)),
            ("jsonl: line-by-line reader (reference)", lambda: _read_slow(big, None)),
        ):
            rows.append((name, size, median_seconds(run, args.repeat)))
    csv_bytes = sum(p.stat().st_size for p in csv_dir.glob("*.csv"))
    rows.append(("csv: import_csv_routing (999 files)", csv_bytes, median_seconds(
        lambda: import_csv_routing(csv_dir), args.repeat)))  # fmt: skip
    print(f"| input | MB | median s ({args.repeat} runs) | MB/s | CPU s | MB per CPU-second |")
    print("|---|---|---|---|---|---|")
    for name, size, (wall, cpu) in rows:
        print(
            f"| {name} | {size / 1e6:.1f} | {wall:.2f} | {size / 1e6 / wall:.1f} | {cpu:.2f} | {size / 1e6 / cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
