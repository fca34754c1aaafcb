"""bench/peers.py's quick path on a tiny random OLMoE: same tokens in every configuration, complete JSON rows."""

from __future__ import annotations

import json

import pytest
import torch
from script_modules import load_script

KEYS = {
    "model",
    "config",
    "budget_bytes",
    "tokens_per_s",
    "ttft_s",
    "peak_bytes",
    "slow_tier_bytes",
    "same_tokens",
    "speedup_vs_accelerate",
}


def _bench():
    return load_script("bench/peers.py")


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    pytest.importorskip("accelerate")
    bench = _bench()
    cache = tmp_path_factory.mktemp("peers")
    threads = torch.get_num_threads()
    lines: list[str] = []
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        # 16 of the quick model's 2 x 16 experts, in the project's budget syntax (total slots): 8 per layer
        code = bench.main(["--quick", "--json", "--cache-dir", str(cache), "--cache-budget", "16"])
    torch.set_num_threads(threads)
    lines = [line for line in buffer.getvalue().splitlines() if line.startswith("{")]
    return code, [json.loads(line) for line in lines], buffer.getvalue()


def test_quick_same_tokens_everywhere(quick_rows):
    code, rows, out = quick_rows
    assert code == 0, out
    configs = {row["config"] for row in rows}
    assert {"resident", "accelerate", "static", "moe-env:lru", "moe-env:lru+lookahead"} <= configs, out
    for row in rows:
        assert "error" not in row, row
        assert row["same_tokens"] is True, row


def test_quick_json_rows(quick_rows):
    _, rows, _ = quick_rows
    for row in rows:
        assert set(row) >= KEYS, row
        assert row["tokens_per_s"] > 0 and row["ttft_s"] > 0 and row["peak_bytes"] > 0
        assert row["slow_tier_bytes"] >= 0
        if row["config"] != "resident":
            assert row["speedup_vs_accelerate"] is not None
    moe = next(r for r in rows if r["config"] == "moe-env:lru")
    acc = next(r for r in rows if r["config"] == "accelerate")
    assert moe["budget_bytes"] == acc["budget_bytes"]
    assert (moe["total_slots"], moe["slots"], moe["allocation"]) == (16, 8, "uniform")
    assert {r["budget_bytes"] for r in rows if r["config"] != "resident"} == {moe["budget_bytes"]}


def test_static_placement_matches_eager(tmp_path):
    """The static executor computes exactly as the family's eager experts (bitwise), pinned or not."""
    from moe_env.engine import greedy_decode
    from moe_env.models import adapter_for
    from moe_env.models.tiny import tiny_model
    from moe_env.peers import StaticPlacement
    from moe_env.store import DiskExpertStore

    reference = tiny_model("olmoe", seed=1)
    expected, _, _, _ = greedy_decode(reference, [1, 2, 3, 4], 6, torch.device("cpu"))
    model = tiny_model("olmoe", seed=1)
    store = DiskExpertStore.write(adapter_for(model), tmp_path / "experts.safetensors")
    static = StaticPlacement(model, store)
    for pinned in (0, 3):
        static.pin(pinned)
        tokens, _, _, _ = greedy_decode(model, [1, 2, 3, 4], 6, torch.device("cpu"))
        assert tokens == expected
    assert static.bytes_read > 0
    store.close()


def test_skeleton_loads_without_experts(tmp_path):
    """load_skeleton: experts stay on meta, every other weight (tied head included) equals the saved model's."""
    from moe_env.models.tiny import tiny_model
    from moe_env.peers import load_skeleton, prepare_model_dir

    source = tmp_path / "src"
    tiny_model("olmoe", seed=2, tie_word_embeddings=True).save_pretrained(source)
    prepared = prepare_model_dir(str(source), tmp_path / "root")
    skeleton = load_skeleton(prepared)
    reference = tiny_model("olmoe", seed=2, tie_word_embeddings=True)
    expected = reference.state_dict()
    for name, tensor in skeleton.state_dict().items():
        if ".mlp.experts." in name:
            assert tensor.is_meta, name
        else:
            assert torch.equal(tensor, expected[name]), name
    assert skeleton.lm_head.weight.data_ptr() == skeleton.model.embed_tokens.weight.data_ptr()
