"""Prompt sets for `moe-env record`: the built-in set (moe_env/assets/prompts.json) or a user file.

A user file is either plain text (one prompt a line; blank lines skipped; ids line-001..., no split) or JSONL
(one ``{"id", "text", "split"}`` object a line; id and split optional). ``builtin`` is the shipped set of 64
original prompts (code and prose) with fixed ids and a fixed 48 train / 16 eval split; ``builtin:eval`` or
``builtin:train`` selects one split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moe_env.errors import UsageError

BUILTIN = "builtin"
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    split: str = ""  # "train" / "eval" / "" (unassigned)


def builtin_prompts_path() -> Path:
    return Path(__file__).resolve().parent / "assets" / "prompts.json"


def load_prompts(spec: str) -> list[Prompt]:
    """Prompts from ``builtin``, ``builtin:SPLIT``, a .txt file (one a line) or a .jsonl file."""
    name, _, split = spec.partition(":")
    if name == BUILTIN:
        if split and split not in SPLITS:
            raise UsageError(f"unknown prompt split {split!r}; use builtin, builtin:train or builtin:eval")
        prompts = _read_builtin()
        return [p for p in prompts if p.split == split] if split else prompts
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"no such prompt file: {spec!r} (give a text file, a .jsonl file or 'builtin')")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the prompt file ({exc})") from None
    prompts = _parse_jsonl(lines, path) if path.suffix == ".jsonl" else _parse_text(lines)
    if not prompts:
        raise UsageError(f"{path}: no prompts in the file")
    return prompts


def _read_builtin() -> list[Prompt]:
    doc = json.loads(builtin_prompts_path().read_text(encoding="utf-8"))
    return [Prompt(p["id"], p["text"], p["split"]) for p in doc["prompts"]]


def _parse_text(lines: list[str]) -> list[Prompt]:
    return [Prompt(f"line-{n:03d}", line) for n, line in enumerate(lines, start=1) if line.strip()]


def _parse_jsonl(lines: list[str], path: Path) -> list[Prompt]:
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"]:
            raise UsageError(f'{path}:{n}: expected an object with a non-empty "text" string')
        split = record.get("split", "")
        if split not in (*SPLITS, ""):
            raise UsageError(f"{path}:{n}: split must be train or eval, got {split!r}")
        prompts.append(Prompt(str(record.get("id", f"line-{n:03d}")), record["text"], split))
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise UsageError(f"{path}: prompt id {duplicate!r} appears more than once")
    return prompts
