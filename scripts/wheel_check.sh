#!/usr/bin/env bash
# CI: what a user gets from `pip install moe-env` with no extras. Builds the wheel, installs it into a fresh venv
# (CPU torch 2.13.0 first), then, from a directory outside the checkout and with its own cache directory, decodes
# with the embedded model, replays a builtin trace and makes the Gymnasium env. Fails on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-env-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
phase() { echo "wheel check: $1 at $((SECONDS - START)) s" >&2; }
.venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" .
phase "wheel built"
"$PYTHON" -m venv "$WORK/venv"
V="$WORK/venv/bin"
# --no-compile: byte-compile only what the check imports, not all of torch and transformers
"$V/python" -m pip install --quiet --no-compile "torch==2.13.0"
"$V/python" -m pip install --quiet --no-compile "$WORK"/dist/moe_env-*.whl
phase "installed"
mkdir "$WORK/run"
cd "$WORK/run"
export XDG_CACHE_HOME="$WORK/cache"
set -x
"$V/moe-env" generate --prompt "def fibonacci(n):" --max-new-tokens 8 --cache-slots 4 --policy lru --prefetch lookahead
"$V/moe-env" record --prompts builtin:eval --limit 1 --max-new-tokens 4 --out "$WORK/run/t.npz"
"$V/moe-env" bench --trace builtin:tiny-mixtral/eval --policies lru,lfu,flat-predictor --prefetch none,predictor --cache-slots 4 --json > bench.json
MOE_ENV_VENV="$WORK/venv" "$V/python" - <<'PY'
import importlib.util
import json
import os

import gymnasium
import moe_env

rows = json.load(open("bench.json"))
assert {r["policy"] for r in rows} >= {"lru", "lfu", "flat-predictor"}, rows
assert {r["prefetch"] for r in rows} >= {"none", "predictor"}, rows  # the shipped shape-agnostic prefetcher
env = gymnasium.make("moe_env/MoEOffload-v0")
obs, info = env.reset(seed=0)
obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
assert env.observation_space.contains(obs), "observation outside its space"
assert moe_env.__file__.startswith(os.environ["MOE_ENV_VENV"]), f"moe_env imported from {moe_env.__file__}"
for generic in ("policies", "agents", "accelerate"):
    assert importlib.util.find_spec(generic) is None, f"the wheel install provides {generic!r}"
print("wheel check: gymnasium.make, step and imports ok")
PY
test -n "$(ls "$XDG_CACHE_HOME"/moe-env/*/experts.safetensors)"  # the expert store went to the XDG cache
set +x
phase "done"
