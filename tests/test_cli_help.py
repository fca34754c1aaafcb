"""Every command and script prints its --help (argparse expands % in help strings: one bare % breaks --help)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from moe_env.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("train", "bench") for p in (ROOT / folder).glob("*.py"))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and command in out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS), out


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script, monkeypatch, capsys):
    """In this process (a subprocess per script would import torch 16 times): --help stops before any work."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str(ROOT / Path(script).parent))
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None)
    assert capsys.readouterr().out.startswith("usage:")
