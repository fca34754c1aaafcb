"""The engine's expert-store cache (moe_env.store_cache): where it lives, and that it cannot grow without bound."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from moe_env.errors import UsageError
from moe_env.store_cache import STORE_NAME, StoreCacheLimits, cache_root, open_entry, prune

DAY = 86400.0


def entry(root: Path, key: str, source: Path, size: int, age_s: float = 0.0) -> Path:
    """A closed cache entry of `size` store bytes for `source`, last used `age_s` ago."""
    source.mkdir(parents=True, exist_ok=True)
    with open_entry(key, source, root, StoreCacheLimits(max_bytes=1 << 60)) as held:
        held.store_path.write_bytes(b"\0" * size)
    when = time.time() - age_s
    os.utime(root / key / "lock", (when, when))
    return root / key


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "moe-env"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the spec says: ignore a relative path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "moe-env"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / ".cache" / "moe-env"


def test_entries_of_deleted_models_are_removed_unless_in_use(tmp_path):
    root = tmp_path / "cache"
    gone = entry(root, "a" * 16, tmp_path / "models" / "gone", 10)
    in_use_source = tmp_path / "models" / "in-use"
    in_use_source.mkdir(parents=True)
    held = open_entry("b" * 16, in_use_source, root, StoreCacheLimits())
    kept = entry(root, "c" * 16, tmp_path / "models" / "kept", 10)
    (tmp_path / "models" / "gone").rmdir()
    in_use_source.rmdir()
    removed = prune(root, StoreCacheLimits())
    assert removed == [gone] and not gone.exists()
    assert held.path.exists() and kept.exists()
    held.close()
    assert prune(root, StoreCacheLimits()) == [held.path]


def test_old_entries_and_the_least_recently_used_beyond_the_size_bound_go(tmp_path):
    root = tmp_path / "cache"
    models = tmp_path / "models"
    ancient = entry(root, "0" * 16, models / "m0", 10, age_s=40 * DAY)
    oldest = entry(root, "1" * 16, models / "m1", 400, age_s=3 * DAY)
    middle = entry(root, "2" * 16, models / "m2", 400, age_s=2 * DAY)
    newest = entry(root, "3" * 16, models / "m3", 400, age_s=1 * DAY)
    scratch = root / "peers"  # not an entry: bench scratch is left alone
    scratch.mkdir()
    (scratch / "model.safetensors").write_bytes(b"\0" * 5000)
    limits = StoreCacheLimits(max_bytes=1200, max_age_s=30 * DAY)  # two entries fit, three do not
    (models / "m4").mkdir()
    with open_entry("4" * 16, models / "m4", root, limits) as opened:
        assert opened.path.exists()
    assert not ancient.exists() and not oldest.exists()
    assert middle.exists() and newest.exists() and scratch.exists()


def test_entries_written_before_source_records_are_removed_by_age_only(tmp_path):
    root = tmp_path / "cache"
    for key, age in (("d" * 16, 40 * DAY), ("e" * 16, DAY)):
        (root / key).mkdir(parents=True)
        store = root / key / STORE_NAME
        store.write_bytes(b"\0" * 10)
        os.utime(store, (time.time() - age, time.time() - age))
    assert prune(root, StoreCacheLimits()) == [root / ("d" * 16)]
    assert (root / ("e" * 16)).exists()


def test_leftover_trash_is_removed(tmp_path):
    root = tmp_path / "cache"
    (root / ".trash-abc").mkdir(parents=True)
    (root / ".trash-abc" / STORE_NAME).write_bytes(b"x")
    prune(root, StoreCacheLimits())
    assert not (root / ".trash-abc").exists()


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf", "nan"])
def test_a_bad_size_bound_is_a_usage_error(monkeypatch, value):
    monkeypatch.setenv("MOE_ENV_CACHE_MAX_GB", value)
    with pytest.raises(UsageError, match="MOE_ENV_CACHE_MAX_GB must be a positive number of GiB"):
        StoreCacheLimits.from_environment()


def test_the_size_bound_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOE_ENV_CACHE_MAX_GB", "0.5")
    assert StoreCacheLimits.from_environment().max_bytes == 2**29


def test_the_engine_keeps_its_store_in_the_cache_and_releases_it(tmp_path, monkeypatch):
    from moe_env.engine import EngineConfig, OffloadEngine
    from moe_env.models.tiny import tiny_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tiny_model("mixtral", seed=1).save_pretrained(tmp_path / "model")
    with OffloadEngine(EngineConfig(model=str(tmp_path / "model"), cache_slots=2)) as engine:
        store = engine.runtime.store.path
        assert store.parent.parent == tmp_path / "xdg" / "moe-env" and store.exists()
        assert prune(store.parent.parent, StoreCacheLimits(max_bytes=0)) == []  # in use: kept
    assert prune(store.parent.parent, StoreCacheLimits(max_bytes=0)) == [store.parent]
