"""Bad inputs across every command, script and the env: exit code 2 (or the exception type for the Python API),
a one-line message naming the problem (stderr's last non-empty line), no traceback, and no output written or
damaged. CLI cases run in-process through moe_env.cli.main (same exit code and message, fast); a few run as
subprocesses where the process boundary matters (SystemExit, Ctrl-C, the installed console script).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from script_modules import load_script

from moe_env.cli import main
from moe_env.env import ENV_ID, LiveMoEOffloadEnv, MoEOffloadEnv
from moe_env.errors import InvalidArgument, TraceFormatError, UsageError
from moe_env.policy import Policy, PolicySpecError, build_policy, make_policy
from moe_env.pretrain import TrainConfig
from moe_env.sim import simulate
from moe_env.trace import SequenceTrace, Trace, TraceMeta, save_trace, validate_trace

REPO = Path(__file__).resolve().parents[1]
LONG_PROMPT = "word " * 1100  # more tokens than tiny-mixtral's 1024 positions

# ------------------------------------------------------------------------------------------ hostile plug-ins

HOSTILE = '''
import sys
import time
import numpy as np
from moe_env.policy import Policy


def fail(what):
    if what == "exit":
        raise SystemExit(3)
    if what == "interrupt":
        raise KeyboardInterrupt
    raise RuntimeError("boom from the plug-in")


class Hostile(Policy):
    """Fails (or misbehaves) in the hook named by `where`."""

    def __init__(self, where="observe", what="error"):
        self.where, self.what = where, what
        if where == "init":
            fail(what)

    def reset(self, spec, capacity):
        super().reset(spec, capacity)
        if self.where == "reset":
            fail(self.what)

    def observe(self, event, cache):
        if self.where == "observe":
            fail(self.what)
        if self.where == "sleep":
            if not getattr(self, "announced", False):
                print("plug-in sleeping", file=sys.stderr, flush=True)
                self.announced = True
            time.sleep(0.05)

    def eviction_scores(self, layer, candidates, cache):
        if self.where == "eviction_scores":
            fail(self.what)
        if self.where == "nan":
            return np.full(len(candidates), np.nan)
        if self.where == "short":
            return np.zeros(len(candidates) + 1)
        if self.where == "text":
            return ["x"] * len(candidates)
        return super().eviction_scores(layer, candidates, cache)

    def prefetch(self, event, cache):
        if self.where == "prefetch":
            fail(self.what)
        if self.where == "far":
            return [(999, 0)]
        if self.where == "garbage":
            return ["not a pair"]
        return ()


class HostilePrefetcher(Hostile):
    prefetch_only = True


class Vandal(Policy):
    """LRU that tries to overwrite the cache's arrays on every event (and swallows the refusal)."""

    refused = 0

    def observe(self, event, cache):
        for layer in range(cache.spec.num_layers):
            for array in (cache.last_use(layer), cache.use_count(layer), cache.loaded_at(layer)):
                try:
                    array[:] = 0
                except ValueError:
                    Vandal.refused += 1
'''
BROKEN_IMPORT = 'raise ImportError("the plug-in needs a package that is not installed")\n'
EXIT_IMPORT = "raise SystemExit(4)\n"
ENTRY_POINTS = """[moe_env.policies]
hostile = hostile_plugins:Hostile
hostile-prefetch = hostile_plugins:HostilePrefetcher
vandal = hostile_plugins:Vandal
broken = hostile_broken:Broken
exit-on-import = hostile_exit:Thing
"""
PLUGIN_MODULES = ("hostile_plugins", "hostile_broken", "hostile_exit")


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory) -> Path:
    """A directory that, on sys.path, installs the hostile plug-ins (a module + *.dist-info entry points)."""
    root = tmp_path_factory.mktemp("plugins")
    (root / "hostile_plugins.py").write_text(textwrap.dedent(HOSTILE))
    (root / "hostile_broken.py").write_text(BROKEN_IMPORT)
    (root / "hostile_exit.py").write_text(EXIT_IMPORT)
    info = root / "hostile_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hostile-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def plugins(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield plugin_dir
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------------ inputs


def _toy_trace(num_layers: int = 2, num_experts: int = 8, top_k: int = 2, steps: int = 24) -> Trace:
    rng = np.random.default_rng(0)
    sequences = []
    for i in range(2):
        experts = np.stack(
            [np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)]) for _ in range(steps)]
        ).astype(np.int16)
        gate = rng.normal(size=(steps, num_layers, num_experts)).astype(np.float32)
        sequences.append(SequenceTrace(experts=experts, gate_logits=gate, prompt_id=f"p{i}"))
    meta = TraceMeta("toy", num_layers, num_experts, top_k, "test", expert_bytes=1 << 20)
    return Trace(meta, sequences)


def _write_with_repeat(good: Path, bad: Path) -> None:
    """A copy of a trace file whose first decode cell routes to one expert twice (CRCs recomputed: only the
    validation can catch it)."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "seq00000/experts.npy":
                array = np.lib.format.read_array(io.BytesIO(data))
                array[0, 0, 1] = array[0, 0, 0]
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, array)
                data = buffer.getvalue()
            dst.writestr(item, data)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Read-only inputs shared by every case (outside each case's working directory)."""
    root = tmp_path_factory.mktemp("inputs")
    trace = root / "toy.npz"
    save_trace(_toy_trace(), trace)
    _write_with_repeat(trace, root / "repeat.npz")
    (root / "truncated.npz").write_bytes(trace.read_bytes()[: trace.stat().st_size // 2])
    (root / "text.npz").write_text("not a zip archive\n")
    (root / "repeat-log.jsonl").write_text(
        json.dumps({"problem_id": 0, "layer": 0, "experts": [1, 1], "gating_probs": [0.5, 0.5]}) + "\n"
    )
    (root / "badline.jsonl").write_text("{not json\n")
    (root / "empty.jsonl").write_text("")
    (root / "prompts-bad.jsonl").write_text('{"id": "a"}\n')
    (root / "prompts-empty.txt").write_text("\n\n")
    (root / "prompts-dup.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    (root / "prompts-long.txt").write_text(f"short prompt\n{LONG_PROMPT}\n")
    source = REPO / "moe_env" / "assets" / "models" / "tiny-mixtral"
    truncated = root / "truncated-model"
    shutil.copytree(source, truncated)
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    tiny_header = root / "tiny-header-model"
    shutil.copytree(source, tiny_header, ignore=shutil.ignore_patterns("model.safetensors"))
    (tiny_header / "model.safetensors").write_bytes(b"\x01\x02")
    (root / "empty-dir").mkdir()
    dense = root / "dense-model"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama"}))
    badjson = root / "badjson-model"
    badjson.mkdir()
    (badjson / "config.json").write_text("{not json")
    configs = {
        "notjson": "{not json",
        "list": "[1, 2]",
        "unknown": json.dumps({"name": "x", "model_type": "mixtral", "colour": "blue"}),
        "noname": json.dumps({"model_type": "mixtral"}),
        "steps-text": json.dumps({"name": "x", "model_type": "mixtral", "steps": "many"}),
        "steps-float": json.dumps({"name": "x", "model_type": "mixtral", "steps": 2.5}),
        "steps-bool": json.dumps({"name": "x", "model_type": "mixtral", "steps": True}),
        "steps-zero": json.dumps({"name": "x", "model_type": "mixtral", "steps": 0}),
        "lr-text": json.dumps({"name": "x", "model_type": "mixtral", "lr": "fast"}),
        "lr-zero": json.dumps({"name": "x", "model_type": "mixtral", "lr": 0}),
        "betas-short": json.dumps({"name": "x", "model_type": "mixtral", "betas": [0.9]}),
        "betas-range": json.dumps({"name": "x", "model_type": "mixtral", "betas": [0.9, 1.5]}),
        "model-list": json.dumps({"name": "x", "model_type": "mixtral", "model": [1]}),
        "name-empty": json.dumps({"name": "", "model_type": "mixtral"}),
        "batch-negative": json.dumps({"name": "x", "model_type": "mixtral", "batch_size": -4}),
        "min-lr-range": json.dumps({"name": "x", "model_type": "mixtral", "min_lr_ratio": 2}),
        "threads-zero": json.dumps({"name": "x", "model_type": "mixtral", "num_threads": 0}),
    }
    for name, text in configs.items():
        (root / f"config-{name}.json").write_text(text)
    paths = {p.stem if p.suffix in (".npz", ".json", ".jsonl", ".txt") else p.name: str(p) for p in root.iterdir()}
    paths.update(
        trace=str(trace), repeat_jsonl=str(root / "repeat-log.jsonl"), badline=str(root / "badline.jsonl"),
        empty_jsonl=str(root / "empty.jsonl"), good_config=str(REPO / "train" / "configs" / "tiny-mixtral.json"),
        badckpt=str(root / "bad-checkpoint"),
    )  # fmt: skip
    bad_ckpt = root / "bad-checkpoint" / "tiny-mixtral"
    bad_ckpt.mkdir(parents=True)
    (bad_ckpt / "checkpoint.pt").write_bytes(b"torn checkpoint")
    return paths


def _immutable(directory: Path) -> bool:
    """Make `directory` immutable (root is stopped by chattr +i, not by chmod); False where unsupported."""
    directory.mkdir()
    if shutil.which("chattr") is None:
        return False
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        return False
    try:
        (directory / "probe").write_text("x")
    except OSError:
        return True
    (directory / "probe").unlink()
    return False


@pytest.fixture
def workdir(tmp_path, monkeypatch, tmp_path_factory):
    """The case's working directory (cwd): a regular file `file.txt`, an existing output `out.npz`, and an
    immutable directory `ro` and file `locked.npz` where the filesystem supports it. HOME points to a shared
    scratch directory (the expert store cache lives there, outside what the cases check)."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "file.txt").write_text("keep me\n")
    (tmp_path / "out.npz").write_bytes(b"previous output")
    ro = tmp_path / "ro"
    has_ro = _immutable(ro)
    locked = tmp_path / "locked.npz"  # an existing output that cannot be replaced
    locked.write_bytes(b"previous locked output")
    if has_ro:
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    monkeypatch.chdir(tmp_path)
    yield tmp_path, has_ro
    if has_ro:
        subprocess.run(["chattr", "-i", str(ro), str(locked)], check=True)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------------------------ CLI table


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # shell words; {name} fields are filled from `inputs`
    expect: str  # must appear in stderr's last non-empty line
    needs: str = ""  # "ro": needs an immutable directory; "plugins": the hostile plug-ins installed


G = "generate --prompt hi --max-new-tokens 4 --cache-slots 4"
R = "record --prompts builtin:eval --limit 1 --max-new-tokens 4 --out new.npz"
B = "bench --trace {trace} --cache-slots 3,4"
A = "analyze {trace} --out report"

CASES = [
    # generate: values
    Case("gen-tokens-0", "generate --prompt hi --max-new-tokens 0", "--max-new-tokens must be >= 1"),
    Case("gen-tokens-neg", "generate --prompt hi --max-new-tokens -5", "--max-new-tokens must be >= 1"),
    Case("gen-tokens-text", "generate --prompt hi --max-new-tokens many", "invalid int value"),
    Case("gen-no-prompt", "generate --max-new-tokens 4", "one of the arguments --prompt --prompts is required"),
    Case("gen-threads-0", f"{G} --threads 0", "argument --threads: must be an integer >= 1, got '0'"),
    Case("gen-threads-neg", f"{G} --threads -1", "argument --threads: must be an integer >= 1, got '-1'"),
    Case("gen-threads-text", f"{G} --threads abc", "argument --threads: must be an integer >= 1, got 'abc'"),
    Case("gen-threads-float", f"{G} --threads 1.5", "argument --threads: must be an integer >= 1, got '1.5'"),
    Case("gen-slots-0", "generate --prompt hi --cache-slots 0", "cache slots 0 outside 2..8"),
    Case("gen-slots-1", "generate --prompt hi --cache-slots 1", "cache slots 1 outside 2..8"),
    Case("gen-slots-9", "generate --prompt hi --cache-slots 9", "cache slots 9 outside 2..8"),
    Case("gen-slots-text", "generate --prompt hi --cache-slots many", "cache slots must be an integer or 'all'"),
    Case("gen-slots-float", "generate --prompt hi --cache-slots 2.5", "cache slots must be an integer or 'all'"),
    Case("gen-policy-unknown", f"{G} --policy nosuch", "unknown policy 'nosuch'"),
    Case("gen-policy-empty", f"{G} --policy ''", "empty policy spec"),
    Case("gen-policy-malformed", f"{G} --policy 'lr u!'", "malformed policy spec"),
    Case("gen-policy-args", f"{G} --policy lru:a,b", "malformed policy spec"),
    Case("gen-decay-text", f"{G} --policy lfu-decay:decay=abc", "bad arguments for policy 'lfu-decay'"),
    Case("gen-decay-bare", f"{G} --policy lfu-decay:decay", "bad arguments for policy 'lfu-decay'"),
    Case("gen-decay-range", f"{G} --policy lfu-decay:decay=2", "decay must be in (0, 1]"),
    Case("gen-decay-unknown-kw", f"{G} --policy lfu-decay:rate=0.5", "unexpected keyword argument 'rate'"),
    Case("gen-random-seed-text", f"{G} --policy random:seed=abc", "bad arguments for policy 'random'"),
    Case("gen-lrfu-range", f"{G} --policy lrfu:lam=-1", "lam must be in [0, 1]"),
    Case("gen-lru-arg", f"{G} --policy lru:3", "bad arguments for policy 'lru'"),
    Case("gen-policy-prefetcher", f"{G} --policy lookahead", "'lookahead' is a prefetcher"),
    Case("gen-prefetch-lru", f"{G} --prefetch lru", "'lru' is not a prefetcher"),
    Case("gen-prefetch-lfu", f"{G} --prefetch lfu-decay:decay=0.5", "is not a prefetcher"),
    Case("gen-prefetch-unknown", f"{G} --prefetch nosuch", "unknown policy 'nosuch'"),
    Case("gen-prefetch-empty", f"{G} --prefetch ''", "empty policy spec"),
    Case("gen-belady", f"{G} --policy belady", "reads the future and needs a trace"),
    Case("gen-oracle", f"{G} --prefetch oracle", "reads the future and needs a trace"),
    Case("gen-ppo-missing", f"{G} --policy ppo:nosuch.zip", "no such policy checkpoint"),
    Case("gen-predictor-missing", f"{G} --prefetch predictor:nosuch.pt", "no such policy checkpoint"),
    Case("gen-predictor-as-policy", f"{G} --policy predictor", "'predictor' is a prefetcher"),
    Case("gen-link", f"{G} --link carrier-pigeon", "carrier-pigeon"),
    Case("gen-device", f"{G} --device tpu", "tpu"),
    Case("gen-dtype", f"{G} --dtype float8", "unknown dtype 'float8'"),
    Case("gen-model-unknown", f"{G} --model nosuch", "neither a local model directory nor an embedded model"),
    Case("gen-model-file", f"{G} --model file.txt", "neither a local model directory nor an embedded model"),
    Case("gen-model-empty-dir", f"{G} --model {{empty-dir}}", "has no config.json"),
    Case("gen-model-dense", f"{G} --model {{dense-model}}", "model type 'llama' is not a supported MoE family"),
    Case("gen-model-badjson", f"{G} --model {{badjson-model}}", "config.json is unreadable"),
    Case("gen-model-truncated", f"{G} --model {{truncated-model}}", "SafetensorError"),
    Case("gen-model-tiny-header", f"{G} --model {{tiny-header-model}}", "cannot load model"),
    Case("gen-context-tokens", "generate --prompt hi --max-new-tokens 2000", "exceed the model's 1024 positions"),
    Case("gen-context-prompt", f"generate --prompt '{LONG_PROMPT}' --max-new-tokens 2", "1024 positions"),
    Case("gen-empty-prompt", "generate --prompt '' --max-new-tokens 2", "empty prompt"),
    # record
    Case("rec-out-dir", "record --prompts builtin:eval --out .", "is a directory; give a file path"),
    Case("rec-out-under-file", "record --prompts builtin:eval --out file.txt/t.npz", "file.txt is a file"),
    Case("rec-out-ro", "record --prompts builtin:eval --out ro/t.npz", "cannot write in", needs="ro"),
    Case("rec-out-locked", "record --prompts builtin:eval --out locked.npz", "cannot be replaced", needs="ro"),
    Case("rec-out-ro-deep", "record --prompts builtin:eval --out ro/a/b/t.npz", "cannot write in", needs="ro"),
    Case("rec-tokens-0", "record --out new.npz --max-new-tokens 0", "--max-new-tokens must be >= 1"),
    Case("rec-threads-0", f"{R} --threads 0", "argument --threads: must be an integer >= 1, got '0'"),
    Case("rec-threads-text", f"{R} --threads abc", "argument --threads: must be an integer >= 1, got 'abc'"),
    Case("rec-limit-0", "record --out new.npz --limit 0", "--limit must be >= 1"),
    Case("rec-no-out", "record --prompts builtin", "the following arguments are required: --out"),
    Case("rec-prompts-missing", "record --out new.npz --prompts nosuch.txt", "no such prompt file"),
    Case("rec-prompts-split", "record --out new.npz --prompts builtin:test", "unknown prompt split 'test'"),
    Case("rec-prompts-bad", "record --out new.npz --prompts {prompts-bad}", 'non-empty "text" string'),
    Case("rec-prompts-empty", "record --out new.npz --prompts {prompts-empty}", "no prompts in the file"),
    Case("rec-prompts-dup", "record --out new.npz --prompts {prompts-dup}", "appears more than once"),
    Case("rec-context", "record --out new.npz --prompts {prompts-long} --max-new-tokens 4", "1024 positions"),
    Case("rec-context-tokens", "record --out new.npz --prompts builtin:eval --max-new-tokens 1100", "positions"),
    Case("rec-policy", f"{R} --policy nosuch", "unknown policy 'nosuch'"),
    Case("rec-prefetch-lru", f"{R} --prefetch lru", "'lru' is not a prefetcher"),
    Case("rec-slots-0", f"{R} --cache-slots 0", "cache slots 0 outside 2..8"),
    Case("rec-model", f"{R} --model nosuch", "neither a local model directory"),
    Case("rec-model-truncated", f"{R} --model {{truncated-model}}", "SafetensorError"),
    Case("rec-decay", f"{R} --policy lfu-decay:decay=abc", "bad arguments for policy 'lfu-decay'"),
    # bench
    Case("bench-policies-empty", f"{B} --policies ''", "--policies is empty"),
    Case("bench-policies-commas", f"{B} --policies ,,", "--policies is empty"),
    Case("bench-prefetch-empty", f"{B} --prefetch ''", "--prefetch is empty"),
    Case("bench-policy-unknown", f"{B} --policies lru,nosuch", "unknown policy 'nosuch'"),
    Case("bench-policy-prefetcher", f"{B} --policies lookahead", "'lookahead' is a prefetcher"),
    Case("bench-prefetch-lru", f"{B} --prefetch none,lru", "'lru' is not a prefetcher"),
    Case("bench-decay-text", f"{B} --policies lfu-decay:decay=abc", "bad arguments for policy 'lfu-decay'"),
    Case("bench-decay-bare", f"{B} --policies lfu-decay:decay", "bad arguments for policy 'lfu-decay'"),
    Case("bench-seed-text", f"{B} --policies random:seed=abc", "bad arguments for policy 'random'"),
    Case("bench-slots-0", "bench --trace {trace} --cache-slots 0", "--cache-slots must be positive"),
    Case("bench-slots-1", "bench --trace {trace} --cache-slots 1,3", "cache slots 1 outside 2..8"),
    Case("bench-slots-9", "bench --trace {trace} --cache-slots 4,9", "cache slots 9 outside 2..8"),
    Case("bench-slots-text", "bench --trace {trace} --cache-slots a,b", "--cache-slots must be integers"),
    Case("bench-slots-empty", "bench --trace {trace} --cache-slots ,", "--cache-slots is empty"),
    Case("bench-reference-0", f"{B} --reference-slots 0", "--reference-slots must be positive"),
    Case("bench-reference-20", f"{B} --reference-slots 20", "cache slots 20 outside 2..8"),
    Case("bench-profile", f"{B} --profile nosuch", "nosuch"),
    Case("bench-profile-experts", f"{B} --profile consumer-pcie4:nosuch", "nosuch"),
    Case("bench-no-trace", "bench --policies lru", "the following arguments are required: --trace"),
    Case("bench-trace-missing", "bench --trace nosuch.npz", "no such trace: 'nosuch.npz'"),
    Case("bench-trace-truncated", "bench --trace {truncated}", "corrupt or truncated trace file"),
    Case("bench-trace-text", "bench --trace {text}", "corrupt or truncated trace file"),
    Case("bench-trace-repeat", "bench --trace {repeat}", "routes to expert"),
    Case("bench-trace-repeat-jsonl", "bench --trace {repeat_jsonl}", "repeat an expert"),
    Case("bench-trace-badline", "bench --trace {badline}", "not valid JSON"),
    Case("bench-trace-empty-jsonl", "bench --trace {empty_jsonl}", "no routing records"),
    Case("bench-builtin-unknown", "bench --trace builtin:nosuch", "no built-in trace 'nosuch'"),
    Case("bench-builtin-split", "bench --trace builtin:tiny-mixtral/test", "unknown split 'test'"),
    Case(
        "bench-budget-workers",
        "bench --trace {trace} --cache-budget 8 --warm --workers 2",
        "--cache-budget sweeps run serially",
    ),
    Case("bench-second-trace-bad", "bench --trace {trace} --trace {repeat} --cache-slots 3", "routes to expert"),
    Case("bench-plots-file", f"{B} --plots file.txt", "exists and is not a directory"),
    Case("bench-plots-file-json", f"{B} --plots file.txt --json", "exists and is not a directory"),
    Case("bench-plots-under-file", f"{B} --plots file.txt/plots", "file.txt is a file"),
    Case("bench-plots-ro", f"{B} --plots ro", "cannot write in", needs="ro"),
    Case("bench-plots-ro-sub", f"{B} --plots ro/plots --json", "cannot write in", needs="ro"),
    # analyze
    Case("an-out-file", "analyze {trace} --out file.txt", "exists and is not a directory"),
    Case("an-out-under-file", "analyze {trace} --out file.txt/report", "file.txt is a file"),
    Case("an-out-ro", "analyze {trace} --out ro", "cannot write in", needs="ro"),
    Case("an-out-ro-sub", "analyze {trace} --out ro/report", "cannot write in", needs="ro"),
    Case("an-no-out", "analyze {trace}", "the following arguments are required: --out"),
    Case("an-trace-missing", "analyze nosuch.npz --out report", "no such trace"),
    Case("an-trace-repeat", "analyze {repeat} --out report", "routes to expert"),
    Case("an-trace-truncated", "analyze {truncated} --out report", "corrupt or truncated"),
    Case("an-slots-0", f"{A} --cache-slots 0", "--cache-slots 0 outside 2..8"),
    Case("an-slots-99", f"{A} --cache-slots 99", "--cache-slots 99 outside 2..8"),
    Case("an-pair-99", f"{A} --layer-pair 99", "--layer-pair 99 outside 0..0"),
    Case("an-pair-neg", f"{A} --layer-pair -1", "--layer-pair -1 outside 0..0"),
    # trace-info
    Case("info-missing", "trace-info nosuch.npz", "no such trace"),
    Case("info-truncated", "trace-info {truncated}", "corrupt or truncated"),
    Case("info-text", "trace-info {text}", "corrupt or truncated"),
    Case("info-repeat", "trace-info {repeat}", "routes to expert"),
    Case("info-repeat-json", "trace-info {repeat} --json", "routes to expert"),
    Case("info-repeat-jsonl", "trace-info {repeat_jsonl}", "repeat an expert"),
    Case("info-empty-jsonl", "trace-info {empty_jsonl}", "no routing records"),
    Case("info-builtin-unknown", "trace-info builtin:nosuch", "no built-in trace 'nosuch'"),
    Case("info-builtin-split", "trace-info builtin:tiny-mixtral/test", "unknown split 'test'"),
    Case("info-dir", "trace-info .", "no .csv files in this directory"),
    # convert (inputs; the importer's own checks are tested with it)
    Case("conv-missing", "convert nosuch.jsonl --out new.npz", "no such input file"),
    Case("conv-experts-0", "convert {repeat_jsonl} --out new.npz --num-experts 0", "--num-experts must be >= 1"),
    Case("conv-repeat", "convert {repeat_jsonl} --out new.npz", "repeat an expert"),
    Case("conv-badline", "convert {badline} --out new.npz", "not valid JSON"),
    # plug-ins failing while imported or built
    Case("plugin-import", f"{B} --policies broken", "policy plug-in 'broken'", needs="plugins"),
    Case("plugin-import-exit", f"{B} --policies exit-on-import", "SystemExit 4", needs="plugins"),
    Case("plugin-init", f"{B} --policies hostile:where=init", "RuntimeError: boom", needs="plugins"),
    Case("plugin-init-exit", f"{B} --policies hostile:where=init,what=exit", "SystemExit 3", needs="plugins"),
    Case("plugin-init-gen", f"{G} --policy hostile:where=init", "RuntimeError: boom", needs="plugins"),
    Case("plugin-kwarg", f"{B} --policies hostile:nowhere=1", "unexpected keyword", needs="plugins"),
    # plug-ins failing while they run (simulator)
    Case("plugin-reset", f"{B} --policies hostile:where=reset", "in reset()", needs="plugins"),
    Case("plugin-observe", f"{B} --policies hostile:where=observe", "in observe()", needs="plugins"),
    Case("plugin-evict", f"{B} --policies hostile:where=eviction_scores", "in eviction_scores()", needs="plugins"),
    Case("plugin-prefetch", f"{B} --prefetch hostile-prefetch:where=prefetch", "in prefetch()", needs="plugins"),
    Case("plugin-exit", f"{B} --policies hostile:what=exit", "exited (SystemExit 3) in", needs="plugins"),
    Case("plugin-interrupt", f"{B} --policies hostile:what=interrupt", "KeyboardInterrupt in", needs="plugins"),
    Case("plugin-nan", f"{B} --policies hostile:where=nan", "returned NaN eviction scores", needs="plugins"),
    Case("plugin-short", f"{B} --policies hostile:where=short", "eviction scores for", needs="plugins"),
    Case("plugin-text", f"{B} --policies hostile:where=text", "non-numeric eviction scores", needs="plugins"),
    Case("plugin-far", f"{B} --prefetch hostile-prefetch:where=far", "out of range", needs="plugins"),
    Case("plugin-garbage", f"{B} --prefetch hostile-prefetch:where=garbage", "not a (layer, expert)", needs="plugins"),
    # plug-ins failing while they run (engine)
    Case("plugin-gen-observe", f"{G} --policy hostile:where=observe", "in observe()", needs="plugins"),
    Case("plugin-gen-exit", f"{G} --policy hostile:where=reset,what=exit", "SystemExit 3", needs="plugins"),
    Case("plugin-gen-prefetch", f"{G} --prefetch hostile-prefetch:where=prefetch", "prefetch()", needs="plugins"),
    Case("plugin-gen-interrupt", f"{G} --policy hostile:what=interrupt", "KeyboardInterrupt", needs="plugins"),
    Case("plugin-gen-prefetcher", f"{G} --prefetch hostile", "'hostile' is not a prefetcher", needs="plugins"),
]

PRETRAIN_CASES = [
    Case("pre-no-config", "--out model", "the following arguments are required: --config"),
    Case("pre-config-missing", "--config nosuch.json --out model", "--config nosuch.json: no such file"),
    Case("pre-config-dir", "--config . --out model", "cannot read it"),
    Case("pre-config-notjson", "--config {config-notjson} --out model", "not valid JSON"),
    Case("pre-config-list", "--config {config-list} --out model", "expected a JSON object"),
    Case("pre-config-unknown", "--config {config-unknown} --out model", "unknown keys ['colour']"),
    Case("pre-config-noname", "--config {config-noname} --out model", "missing required keys ['name']"),
    Case("pre-steps-text", "--config {config-steps-text} --out model", 'steps must be an integer, got "many"'),
    Case("pre-steps-float", "--config {config-steps-float} --out model", "steps must be an integer, got 2.5"),
    Case("pre-steps-bool", "--config {config-steps-bool} --out model", "steps must be an integer, got true"),
    Case("pre-steps-zero", "--config {config-steps-zero} --out model", "steps must be >= 1, got 0"),
    Case("pre-lr-text", "--config {config-lr-text} --out model", "lr must be a number"),
    Case("pre-lr-zero", "--config {config-lr-zero} --out model", "lr must be > 0"),
    Case("pre-betas-short", "--config {config-betas-short} --out model", "betas must be a list of two numbers"),
    Case("pre-betas-range", "--config {config-betas-range} --out model", "betas must be two numbers in [0, 1)"),
    Case("pre-model-list", "--config {config-model-list} --out model", "model must be a JSON object"),
    Case("pre-name-empty", "--config {config-name-empty} --out model", "name must be a non-empty string"),
    Case("pre-batch-neg", "--config {config-batch-negative} --out model", "batch_size must be >= 1"),
    Case("pre-min-lr", "--config {config-min-lr-range} --out model", "min_lr_ratio must be in [0, 1]"),
    Case("pre-threads-cfg", "--config {config-threads-zero} --out model", "num_threads must be >= 1"),
    Case("pre-steps-0", "--config {good_config} --out model --steps 0", "--steps must be >= 1, got 0"),
    Case("pre-steps-neg", "--config {good_config} --out model --steps -3", "--steps must be >= 1"),
    Case("pre-threads-0", "--config {good_config} --out model --threads 0", "--threads must be >= 1"),
    Case("pre-stop-after-0", "--config {good_config} --out model --stop-after 0", "--stop-after must be >= 1"),
    Case("pre-resume-none", "--config {good_config} --out model --resume", "--resume: no checkpoint at"),
    Case(
        "pre-resume-torn",
        "--config {good_config} --out model --resume --run-dir {badckpt}/tiny-mixtral",
        "is not a readable checkpoint",
    ),
    Case("pre-out-file", "--config {good_config} --out file.txt", "exists and is not a directory"),
    Case("pre-out-under-file", "--config {good_config} --out file.txt/model", "file.txt is a file"),
    Case("pre-out-ro", "--config {good_config} --out ro/model", "cannot write in", needs="ro"),
    Case("pre-run-dir-file", "--config {good_config} --out model --run-dir file.txt", "--run-dir file.txt"),
    Case("pre-run-dir-ro", "--config {good_config} --out model --run-dir ro/run", "cannot write in", needs="ro"),
]


def _argv(case: Case, inputs: dict[str, str]) -> list[str]:
    return shlex.split(case.argv.format(**{k: shlex.quote(v) for k, v in inputs.items()}))


def _run_in_process(entry, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = entry(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _check_failure(case: Case, code: int, out: str, err: str, prefix: str) -> None:
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {err}"
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith(prefix) and ": error: " in last, last
    assert case.expect in last, last


def _prepare(case: Case, workdir, request) -> Path:
    root, has_ro = workdir
    if case.needs == "ro" and not has_ro:
        pytest.skip("this filesystem cannot make a directory immutable (chattr +i)")
    if case.needs == "plugins":
        request.getfixturevalue("plugins")
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input(case: Case, inputs, workdir, capsys, request):
    root = _prepare(case, workdir, request)
    argv = _argv(case, inputs)
    before = _snapshot(root)
    code, out, err = _run_in_process(main, argv, capsys)
    _check_failure(case, code, out, err, f"moe-env {argv[0]}")
    assert _snapshot(root) == before, "an output was written or damaged"


@pytest.fixture(scope="module")
def pretrain_main():
    return load_script("train/pretrain.py").main


@pytest.mark.parametrize("case", PRETRAIN_CASES, ids=[c.id for c in PRETRAIN_CASES])
def test_pretrain_bad_input(case: Case, inputs, workdir, capsys, request, pretrain_main):
    root = _prepare(case, workdir, request)
    before = _snapshot(root)
    code, out, err = _run_in_process(pretrain_main, _argv(case, inputs), capsys)
    _check_failure(case, code, out, err, "pretrain.py")
    assert _snapshot(root) == before, "an output was written or damaged"


# ------------------------------------------------------------------------------------------------ Python API


def _replay(inputs, **kwargs):
    return MoEOffloadEnv(inputs["trace"], **kwargs)


def _stepped(inputs, action):
    env = _replay(inputs, capacity=4)
    env.reset(seed=0)
    env.step(action)


def _finished(inputs):
    env = _replay(inputs, capacity=4)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, _ = env.step(np.zeros(8, dtype=np.float32))
    env.step(np.zeros(8, dtype=np.float32))


def _tiny_live(**kwargs):
    from moe_env.models.tiny import tiny_model

    return LiveMoEOffloadEnv(model=tiny_model("mixtral", seed=0), prompts=[[1, 2, 3]], **kwargs)


def _live_stepped(action):
    env = _tiny_live(max_new_tokens=4, capacity=4)
    try:
        env.reset(seed=0)
        env.step(action)
    finally:
        env.close()


API_CASES = [
    ("env-capacity-0", lambda i: _replay(i, capacity=0), InvalidArgument, "capacity 0 outside 2..8"),
    ("env-capacity-neg", lambda i: _replay(i, capacity=-1), InvalidArgument, "capacity -1 outside"),
    ("env-capacity-float", lambda i: _replay(i, capacity=2.5), InvalidArgument, "capacity must be an integer"),
    ("env-capacity-str", lambda i: _replay(i, capacity="4"), InvalidArgument, "capacity must be an integer"),
    ("env-capacity-bool", lambda i: _replay(i, capacity=True), InvalidArgument, "capacity must be an integer"),
    ("env-capacity-1", lambda i: _replay(i, capacity=1), InvalidArgument, "capacity 1 outside 2..8"),
    ("env-capacity-9", lambda i: _replay(i, capacity=9), InvalidArgument, "capacity 9 outside 2..8"),
    ("env-make-capacity-0", lambda i: gym.make(ENV_ID, trace=i["trace"], capacity=0), ValueError, "capacity 0"),
    ("env-make-capacity-float", lambda i: gym.make(ENV_ID, trace=i["trace"], capacity=2.5), ValueError, "integer"),
    ("env-make-live-capacity-0", lambda i: gym.make(ENV_ID, backend="live", capacity=0), ValueError, "capacity 0"),
    ("env-live-capacity-float", lambda i: _tiny_live(capacity=2.5), InvalidArgument, "capacity must be an integer"),
    ("env-live-capacity-9", lambda i: _tiny_live(capacity=9), InvalidArgument, "capacity 9 outside"),
    ("env-live-tokens-1", lambda i: _tiny_live(max_new_tokens=1), InvalidArgument, "max_new_tokens must be"),
    ("env-live-tokens-float", lambda i: _tiny_live(max_new_tokens=2.5), InvalidArgument, "max_new_tokens must be"),
    ("env-live-context", lambda i: _tiny_live(max_new_tokens=300), UsageError, "exceed the model's 256 positions"),
    ("env-live-reward", lambda i: _tiny_live(reward="stall_vs_lru"), UsageError, "reward='stall' only"),
    ("env-live-threads-0", lambda i: _tiny_live(threads=0), InvalidArgument, "threads must be an integer >= 1"),
    ("env-live-threads-float", lambda i: _tiny_live(threads=1.5), InvalidArgument, "threads must be an integer"),
    ("env-live-step-wrong-length", lambda i: _live_stepped(np.zeros(3)), InvalidArgument, r"shape \(8,\)"),
    ("env-live-step-nan", lambda i: _live_stepped(np.full(8, np.nan)), InvalidArgument, "NaN"),
    ("env-backend", lambda i: gym.make(ENV_ID, backend="nosuch"), UsageError, "unknown env backend"),
    ("env-reward", lambda i: _replay(i, reward="hits"), UsageError, "unknown reward 'hits'"),
    ("env-trace-missing", lambda i: MoEOffloadEnv("nosuch.npz"), UsageError, "no such trace"),
    ("env-trace-repeat", lambda i: MoEOffloadEnv(i["repeat"]), TraceFormatError, "routes to expert"),
    ("env-fallback", lambda i: _replay(i, fallback="nosuch"), PolicySpecError, "unknown policy"),
    ("env-fallback-args", lambda i: _replay(i, fallback="lfu-decay:decay=x"), PolicySpecError, "bad arguments"),
    ("env-step-before-reset", lambda i: _replay(i).step(np.zeros(8)), gym.error.ResetNeeded, "call reset"),
    ("env-step-after-end", _finished, gym.error.ResetNeeded, "the episode has ended"),
    ("env-step-short", lambda i: _stepped(i, np.zeros(3)), InvalidArgument, r"shape \(8,\).*got \(3,\)"),
    ("env-step-long", lambda i: _stepped(i, np.ones(20)), InvalidArgument, r"got \(20,\)"),
    ("env-step-column", lambda i: _stepped(i, np.zeros((8, 1))), InvalidArgument, r"got \(8, 1\)"),
    ("env-step-batch", lambda i: _stepped(i, np.zeros((2, 8))), InvalidArgument, r"got \(2, 8\)"),
    ("env-step-scalar", lambda i: _stepped(i, 0.5), InvalidArgument, r"got \(\)"),
    ("env-step-nan", lambda i: _stepped(i, np.full(8, np.nan)), InvalidArgument, "NaN or inf"),
    ("env-step-inf", lambda i: _stepped(i, np.full(8, np.inf)), InvalidArgument, "NaN or inf"),
    ("env-step-text", lambda i: _stepped(i, ["a"] * 8), InvalidArgument, "real numbers"),
    ("env-step-none", lambda i: _stepped(i, None), InvalidArgument, "real numbers"),
    ("env-step-bool", lambda i: _stepped(i, np.ones(8, dtype=bool)), InvalidArgument, "real numbers"),
    ("env-step-complex", lambda i: _stepped(i, np.ones(8, dtype=complex)), InvalidArgument, "real numbers"),
    ("env-reset-sequence", lambda i: _replay(i).reset(options={"sequence": 9}), UsageError, "sequence 9"),
    ("policy-decay-text", lambda i: make_policy("lfu-decay:decay=abc"), PolicySpecError, "bad arguments"),
    ("policy-seed-text", lambda i: make_policy("random:seed=abc"), PolicySpecError, "bad arguments"),
    ("policy-lru-as-prefetch", lambda i: build_policy("lru", "lru"), PolicySpecError, "not a prefetcher"),
    ("policy-prefetch-as-policy", lambda i: build_policy("lookahead"), PolicySpecError, "is a prefetcher"),
    ("sim-prefetch-lfu", lambda i: simulate(_toy_trace(), "lru", 4, prefetch="lfu"), PolicySpecError, "prefetcher"),
    ("trace-repeat-validate", lambda i: validate_trace(_repeat_trace()), TraceFormatError, "expert 3 twice"),
    ("trace-repeat-save", lambda i: save_trace(_repeat_trace(), "never.npz"), TraceFormatError, "twice"),
    ("config-steps-text", lambda i: TrainConfig.from_file(i["config-steps-text"]), UsageError, "integer"),
    ("config-missing", lambda i: TrainConfig.from_file("nosuch.json"), UsageError, "no such file"),
]


def _repeat_trace() -> Trace:
    trace = _toy_trace()
    trace.sequences[0].experts[5, 1] = (3, 3)
    return trace


@pytest.mark.parametrize(("fn", "error", "match"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_python_api_bad_input(fn, error, match, inputs, workdir):
    root, _ = workdir
    before = _snapshot(root)
    with pytest.raises(error, match=match) as info:
        fn(inputs)
    assert len(str(info.value).splitlines()) == 1
    assert _snapshot(root) == before


def test_env_errors_are_value_errors():
    """Gymnasium callers catch ValueError for a bad argument; the CLI catches UsageError: InvalidArgument is both."""
    assert issubclass(InvalidArgument, ValueError) and issubclass(InvalidArgument, UsageError)


# ------------------------------------------------------------------------------------------------ the cache's arrays


def test_cache_view_arrays_are_read_only():
    from moe_env.cache import ExpertCacheState
    from moe_env.policy import ModelSpec, RouteEvent

    cache = ExpertCacheState(ModelSpec(2, 8, 2), 4, Policy())
    cache.route(RouteEvent(step=0, layer=0, experts=(1, 2)))
    for array in (cache.last_use(0), cache.use_count(0), cache.loaded_at(0)):
        with pytest.raises(ValueError, match="read-only"):
            array[1] = 99
    assert cache.last_use(0)[1] == 1 and cache.use_count(0)[2] == 1 and cache.loaded_at(0)[2] == 2


def test_a_vandal_plugin_cannot_change_lrus_hit_rate(plugins):
    trace = _toy_trace(steps=60)
    lru = simulate(trace, "lru", 3, "consumer-pcie4", fast=False)
    vandal = simulate(trace, "vandal", 3, "consumer-pcie4")  # LRU scores (the base Policy) + writes refused
    module = sys.modules["hostile_plugins"]
    assert module.Vandal.refused > 0
    assert (vandal.hits, vandal.misses) == (lru.hits, lru.misses)


# ------------------------------------------------------------------------------------------------ process boundary


def _console(args: list[str], plugin_dir: Path, cwd: Path, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(plugin_dir))
    return subprocess.Popen(
        [sys.executable, "-m", "moe_env.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "expect"),
    [("hostile:what=exit", "exited (SystemExit 3) in observe()"), ("hostile:what=interrupt", "KeyboardInterrupt")],
)
def test_plugin_escapes_exit_2_across_the_process_boundary(policy, expect, plugin_dir, inputs, tmp_path):
    proc = _console(
        ["bench", "--trace", inputs["trace"], "--policies", policy, "--cache-slots", "3"], plugin_dir, tmp_path
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("moe-env bench: error: policy plug-in 'hostile:") and expect in last
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_by_the_user_still_interrupts_inside_a_plugin(plugin_dir, inputs, tmp_path):
    """SIGINT arriving while the plug-in runs (it sleeps in observe) is the user's: exit 130, not a plug-in error."""
    proc = _console(
        ["bench", "--trace", inputs["trace"], "--policies", "hostile:where=sleep", "--cache-slots", "3"],
        plugin_dir,
        tmp_path,
    )
    # wait until the replay runs inside the plug-in (each observe sleeps 50 ms: the run would take minutes)
    seen = []
    while not seen or "plug-in sleeping" not in seen[-1]:
        seen.append(proc.stderr.readline())
        assert seen[-1], f"the command ended before the plug-in ran: {''.join(seen)}"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "moe-env bench: interrupted"
    assert "Traceback" not in err


def test_installed_console_script_reports_one_line(tmp_path):
    script = Path(sys.executable).parent / "moe-env"
    if not script.exists():
        pytest.skip("moe-env console script not installed next to this interpreter")
    proc = subprocess.run(
        [str(script), "bench", "--trace", "builtin:tiny-mixtral/eval", "--policies", ""],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("moe-env bench: error: --policies is empty")
    assert list(tmp_path.iterdir()) == []


def test_the_table_is_big_enough():
    assert len(CASES) + len(PRETRAIN_CASES) + len(API_CASES) >= 120
