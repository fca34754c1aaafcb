"""A plain install works: the engine needs no optional package, usage errors come before torch is imported,
and --threads reaches torch (its bad values are in tests/test_bad_inputs.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_env.checkpoint import load_skeleton
from moe_env.cli import COMMANDS, main
from moe_env.models.tiny import FAMILIES, tiny_model


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_usage_errors_do_not_import_torch():
    """Every command's arguments are parsed before anything heavy is imported (a bad flag answers at once)."""
    code = (
        "import sys\nfrom moe_env.cli import main, COMMANDS\n"
        "for name in COMMANDS:\n"
        "    try:\n        main([name, '--no-such-flag'])\n    except SystemExit as exc:\n"
        "        assert exc.code == 2, (name, exc.code)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'matplotlib', 'stable_baselines3') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "heavy: []"
    assert all(f"moe-env {name}: error:" in result.stderr for name in COMMANDS)


# Makes `accelerate` look uninstalled to this interpreter (find_spec None, import fails), as in a plain install.
HIDE_ACCELERATE = """
import sys
class Hide:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path, target=None):
        return None if name.split(".")[0] == "accelerate" else self.inner.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)
sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
"""


def test_loading_and_decoding_a_checkpoint_does_not_need_accelerate(tmp_path):
    tiny_model("mixtral", seed=2).save_pretrained(tmp_path / "model")
    code = HIDE_ACCELERATE + (
        "from moe_env.engine import EngineConfig, OffloadEngine\n"
        f"config = EngineConfig(model={str(tmp_path / 'model')!r}, cache_slots=2, store_dir={str(tmp_path)!r})\n"
        "with OffloadEngine(config) as engine:\n"
        "    print(len(engine.generate([1, 2, 3], 3).tokens), 'accelerate' in sys.modules)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3 False"


@pytest.mark.parametrize("family", FAMILIES)
def test_skeleton_buffers_equal_from_pretrained(tmp_path, family):
    """Built on meta with torch's device context, the buffers (rotary frequencies) are computed as from_pretrained
    computes them, and every non-expert tensor is the checkpoint's."""
    tiny_model(family, seed=3).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    skeleton = load_skeleton(tmp_path)
    buffers = dict(reference.named_buffers())
    assert buffers and dict(skeleton.named_buffers()).keys() == buffers.keys()
    for name, buffer in skeleton.named_buffers():
        assert buffer.device.type == "cpu" and torch.equal(buffer, buffers[name]), name
    expected = reference.state_dict()
    for name, tensor in skeleton.state_dict().items():
        assert tensor.is_meta == (".experts." in name), name
        if not tensor.is_meta:
            assert torch.equal(tensor, expected[name]), name


def test_threads_are_applied(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    argv = ["generate", "--model", "tiny-mixtral", "--prompt", "hi", "--max-new-tokens", "2"]
    assert main([*argv, "--threads", "3", "--json"]) == 0
    assert main([*argv, "--json"]) == 0
    from moe_env.threads import DEFAULT_THREADS

    assert seen == [3, DEFAULT_THREADS]
