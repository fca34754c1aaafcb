"""`moe-env record`: the recorder attached to the real offload engine, the CLI, and the prompt sets."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from moe_env.cache import ExpertCacheState
from moe_env.cli import main
from moe_env.commands.record import record_trace
from moe_env.engine import EngineConfig, GenerationResult, OffloadEngine
from moe_env.errors import UsageError
from moe_env.models.tiny import byte_tokenizer, tiny_model
from moe_env.policy import ModelSpec, build_policy
from moe_env.prompts import Prompt, load_prompts
from moe_env.routing import LayerRouting, route_events
from moe_env.trace import read_trace_file, save_trace

PROMPTS = [Prompt("p0", "def area(r):", "train"), Prompt("p1", "The river rose.", "eval")]
NEW_TOKENS = 5
SLOTS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-mixtral-random")
    tiny_model("mixtral", seed=0, vocab_size=256).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def test_recorded_trace_is_what_the_engine_routed(model_dir: Path, tmp_path: Path) -> None:
    config = EngineConfig(
        model=str(model_dir), cache_slots=SLOTS, policy="lru", prefetch="lookahead", store_dir=str(tmp_path / "store")
    )
    seen: list[list[LayerRouting]] = []
    results: list[GenerationResult] = []
    with OffloadEngine(config) as engine:
        engine.on_sequence_start(lambda ids: seen.append([]))
        engine.add_observer(lambda routing: seen[-1].append(routing))
        engine.on_sequence_end(results.append)
        trace = record_trace(engine, PROMPTS, NEW_TOKENS, model_name="random")
        spec = engine.spec

    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (2, 8, 2)
    assert trace.meta.expert_bytes == spec.expert_bytes > 0
    assert trace.meta.config_hash == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert trace.meta.extra["weights_sha256"] == weights
    assert [(s.prompt_id, s.split) for s in trace.sequences] == [("p0", "train"), ("p1", "eval")]
    for seq, routings, result in zip(trace.sequences, seen, results, strict=True):
        assert seq.num_steps == NEW_TOKENS - 1 and seq.output_ids.tolist() == result.tokens
        assert seq.prompt_ids.tolist() == list(
            PROMPTS[0].text.encode() if seq.prompt_id == "p0" else b"The river rose."
        )
        for routing in routings:
            if routing.prefill:
                np.testing.assert_array_equal(seq.prefill_experts[:, routing.layer], routing.experts)
                np.testing.assert_array_equal(seq.prefill_gate_logits[routing.layer], routing.gate_logits[-1])
                continue
            np.testing.assert_array_equal(seq.experts[routing.step, routing.layer], routing.experts[0])
            np.testing.assert_array_equal(seq.weights[routing.step, routing.layer], routing.weights[0])
            np.testing.assert_array_equal(seq.gate_logits[routing.step, routing.layer], routing.gate_logits[0])
            if routing.lookahead_logits is None:
                assert np.isnan(seq.lookahead_logits[routing.step, routing.layer]).all()
            else:
                np.testing.assert_array_equal(
                    seq.lookahead_logits[routing.step, routing.layer], routing.lookahead_logits[0]
                )
        assert (seq.experts >= 0).all()  # the engine routes every layer of every step

    # replaying the trace through the engine's policy gives the engine's counters, prefill and prefetch included
    for seq, result in zip(trace.sequences, results, strict=True):
        assert _replay(seq, spec, "lru", "lookahead") == _engine_counters(result)
    assert all(r.metrics.prefetch_issued > 0 and r.metrics.prefill_misses > 0 for r in results)  # not vacuous
    # the file keeps the routing exactly (logits are float16: a logit-driven policy may differ on near-ties)
    saved = read_trace_file(save_trace(trace, tmp_path / "recorded.npz"))
    for seq, loaded in zip(trace.sequences, saved.sequences, strict=True):
        assert _replay(loaded, spec, "lru", None) == _replay(seq, spec, "lru", None)


COUNTERS = ("hits", "misses", "prefill_hits", "prefill_misses", "prefetch_issued", "prefetch_used", "evictions")


def _replay(seq, spec: ModelSpec, policy: str, prefetch: str | None) -> dict[str, int]:
    cache = ExpertCacheState(spec, SLOTS, build_policy(policy, prefetch))
    cache.begin_sequence()
    for routing in seq.routings():
        for event in route_events(routing, SLOTS):
            cache.route(event)
    cache.finish()
    return {name: getattr(cache.counters, name) for name in COUNTERS}


def _engine_counters(result: GenerationResult) -> dict[str, int]:
    return {name: getattr(result.metrics, name) for name in COUNTERS}


def test_record_cli(model_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "text": "x = 1", "split": "train"}) + "\n" + json.dumps({"text": "hello"}) + "\n"
    )
    out = tmp_path / "t.npz"
    argv = ["record", "--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "3", "--out", str(out)]
    assert main([*argv, "--cache-slots", "2"]) == 0
    trace = read_trace_file(out)
    assert trace.meta.source == "record" and trace.meta.model == model_dir.name
    assert trace.meta.extra["max_new_tokens"] == 3
    assert [(s.prompt_id, s.split, s.num_steps) for s in trace.sequences] == [("a", "train", 2), ("line-002", "", 2)]
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompts", "no/such/file.txt"], "no such prompt file"),
        (["--prompts", "builtin:test"], "unknown prompt split 'test'"),
        (["--cache-slots", "1"], "cache slots 1 outside 2..8"),
        (["--model", "no-such-model"], "neither a local model directory nor an embedded model"),
    ],
)
def test_record_cli_errors(model_dir: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "t.npz"
    argv = ["record", "--model", str(model_dir), "--prompts", "builtin", "--limit", "1", "--out", str(out), *extra]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("moe-env record: error: ") and message in errors[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ prompts


def test_builtin_prompts() -> None:
    prompts = load_prompts("builtin")
    assert len(prompts) == 64 and len({p.id for p in prompts}) == 64
    assert sum(p.split == "train" for p in prompts) == 48 and sum(p.split == "eval" for p in prompts) == 16
    assert [p.id for p in load_prompts("builtin:eval")] == [p.id for p in prompts if p.split == "eval"]
    kinds = {p.id.split("-")[0] for p in load_prompts("builtin:eval")}
    assert kinds == {"code", "prose"}  # both kinds in each split


def test_builtin_code_prompts_are_not_from_the_stdlib() -> None:
    """The embedded models are trained on the stdlib: prompts copied from it would be memorised text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)]
    sources = "\n".join(p.read_text(errors="replace") for p in files)
    for prompt in load_prompts("builtin"):
        assert prompt.text not in sources, prompt.id
        signature = next((line for line in prompt.text.splitlines() if line.startswith(("def ", "class "))), None)
        assert signature is None or signature not in sources, (prompt.id, signature)


def test_prompt_files(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    assert load_prompts(str(text)) == [Prompt("line-001", "first"), Prompt("line-003", "second")]
    for content, message in [
        ("{oops\n", "p.jsonl:1: not valid JSON"),
        ('{"id": "x"}\n', 'p.jsonl:1: expected an object with a non-empty "text"'),
        ('{"text": "a", "split": "dev"}\n', "split must be train or eval"),
        ('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', "prompt id 'x' appears more than once"),
        ("\n", "no prompts"),
    ]:
        jsonl = tmp_path / "p.jsonl"
        jsonl.write_text(content)
        with pytest.raises(UsageError, match=message):
            load_prompts(str(jsonl))
