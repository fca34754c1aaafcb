"""The repository's bench/ and train/ scripts loaded as modules, so tests call their functions and main() in-process
(the scripts are not a package: they are run as `python bench/NAME.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """A fresh module object for the script at `relative` (e.g. "train/ppo.py"); not entered in sys.modules."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location("script_" + relative.replace("/", "_").removesuffix(".py"), path)
    assert spec is not None and spec.loader is not None, f"no script at {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
