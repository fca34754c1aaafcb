"""`moe-env generate`: the --json shape, the human table, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json

import pytest

from moe_env.cli import main
from moe_env.models.tiny import byte_tokenizer, tiny_model

METRIC_NAMES = {
    "hits", "misses", "hit_rate", "prefetch_issued", "prefetch_used", "prefetch_wasted", "bytes_moved", "stall_s",
    "tokens_per_s", "peak_cache_bytes", "prefill_hits", "prefill_misses", "ttft_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-mixtral")
    tiny_model("mixtral", seed=0, vocab_size=256).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_json_output(model_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))  # the expert store cache goes there
    code = main(
        [
            *("generate", "--model", str(model_dir), "--prompt", "def f(x):", "--max-new-tokens", "5"),
            *("--cache-slots", "2", "--policy", "lfu", "--prefetch", "lookahead", "--link", "pcie4", "--json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and len(out.strip().splitlines()) == 1
    payload = json.loads(out)
    assert set(payload) == {"tokens", "text", "metrics"}
    assert len(payload["tokens"]) == 5 and isinstance(payload["text"], str)
    assert set(payload["metrics"]) >= METRIC_NAMES
    assert payload["metrics"]["hits"] + payload["metrics"]["misses"] == 4 * 2 * 2  # 4 decode steps, 2 layers, top-2
    assert list((tmp_path / ".cache" / "moe-env").glob("*/experts.safetensors"))


def test_human_output(model_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "hit_rate" in out and "tokens_per_s" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cache-slots", "1"], "cache slots 1 outside 2..8"),
        (["--cache-slots", "9"], "cache slots 9 outside 2..8"),
        (["--cache-slots", "lots"], "integer or 'all'"),
        (["--policy", "no-such-policy"], "unknown policy 'no-such-policy'"),
        (["--policy", "lru:=3"], "malformed policy"),
        (["--prefetch", "no-such-prefetcher"], "unknown policy"),
        (["--link", "carrier-pigeon"], "unknown link 'carrier-pigeon'"),
        (["--device", "tpu"], "device"),
        (["--max-new-tokens", "0"], "max-new-tokens must be >= 1"),
        (["--dtype", "int3"], "unknown dtype"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_dir, capsys, tmp_path, monkeypatch, extra, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    code = main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([line for line in err if line.startswith("moe-env generate: error:")]) == 1
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_unknown_model_path(capsys, tmp_path):
    code = main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"])
    assert code == 2 and "neither a local model directory nor an embedded model" in capsys.readouterr().err


def test_non_moe_model(dense_dir, capsys):
    code = main(["generate", "--model", str(dense_dir), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "'llama' is not a supported MoE family" in err and len(err.strip().splitlines()) == 1


def test_prompts_file_is_served_warm_by_one_engine(model_dir, tmp_path, capsys):
    """--prompts: one JSON line per prompt; warm (default) the repeated prompt finds its experts resident."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n\ndef f(x):\n", encoding="utf-8")
    rows = {}
    for mode in ("warm", "cold"):
        code = main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "4",
                     "--cache-budget", "0.5", "--allocation", "shared", "--prefill", "bypass", "--json",
                     *(["--cold"] if mode == "cold" else [])])  # fmt: skip
        assert code == 0
        rows[mode] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [row["prompt"] for row in rows[mode]] == ["def f(x):", "def f(x):"]
    warm, cold = rows["warm"], rows["cold"]
    assert warm[0]["tokens"] == warm[1]["tokens"] == cold[1]["tokens"]
    assert cold[0]["metrics"]["misses"] == cold[1]["metrics"]["misses"]  # cold: the same work twice
    assert warm[1]["metrics"]["misses"] + warm[1]["metrics"]["prefill_misses"] < (
        cold[1]["metrics"]["misses"] + cold[1]["metrics"]["prefill_misses"]
    )


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [(["--cache-budget", "lots"], "cannot read cache budget"),
     (["--allocation", "diagonal"], "unknown cache allocation"),
     (["--prompts", "/nonexistent/p.txt"], "cannot read --prompts")],
)  # fmt: skip
def test_bad_budget_allocation_or_prompts_file_is_one_line(model_dir, capsys, extra, fragment):
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "2", *extra]
    if "--prompts" not in extra:
        args += ["--prompt", "hi"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
