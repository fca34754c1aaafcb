"""Shared fixtures: tiny random-weight MoE models of every supported family (fp32, eager experts)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from moe_env.models.tiny import FAMILIES, tiny_model

PROMPT_IDS = [3, 17, 99, 5, 42, 7, 1, 64, 12, 88]


@pytest.fixture(scope="session")
def tiny_models() -> Callable[[str], torch.nn.Module]:
    """`tiny_models(family)` -> a fresh deep copy of a cached random-weight model (safe to patch in place)."""
    built: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in built:
            built[family] = tiny_model(family, seed=0)
        return copy.deepcopy(built[family])

    return get


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest single-threaded; a shared 2-core CI box thrashes with OpenMP teams."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Engines built from model directories cache their expert stores (moe_env.store_cache): not in the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield
