"""Splits by sequence for the training scripts, model identity of checkpoints, strict JSON of the final tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from moe_env.agents.checkpoint import check_model
from moe_env.agents.evaluate import HEURISTICS, heuristics_for, json_text
from moe_env.agents.traces import make_splits, split_validation

from moe_env.errors import CheckpointError, UsageError
from moe_env.policy import ModelSpec
from moe_env.trace import SequenceTrace, Trace, TraceMeta, save_trace


def _trace(n: int, seed: int = 0, model: str = "toy", lookahead: bool = False) -> Trace:
    rng = np.random.default_rng(seed)
    sequences = []
    for i in range(n):
        experts = np.stack([rng.permutation(8)[:2] for _ in range(5 * 3)]).reshape(5, 3, 2).astype(np.int16)
        look = rng.normal(size=(5, 3, 8)).astype(np.float32) if lookahead else None
        sequences.append(SequenceTrace(experts=experts, lookahead_logits=look, prompt_id=str(i + 1)))
    return Trace(TraceMeta(model, 3, 8, 2, "test"), sequences)


def test_split_validation_refuses_what_cannot_be_split() -> None:
    train, validation = split_validation(_trace(10))
    assert [s.prompt_id for s in validation.sequences] == ["9", "10"] and len(train.sequences) == 8
    train, validation = split_validation(_trace(2))
    assert (len(train.sequences), len(validation.sequences)) == (1, 1)
    with pytest.raises(UsageError, match="a validation split needs at least 2"):
        split_validation(_trace(1))  # validating on the training data measured nothing (workflow break 3)


def test_make_splits_holds_out_evaluation_and_refuses_overlaps(tmp_path) -> None:
    path = save_trace(_trace(20), tmp_path / "t.npz")
    splits = make_splits(str(path), None)
    ids = [[s.prompt_id for s in t.sequences] for t in (splits.train, splits.validation, splits.evaluation)]
    assert ids == [[str(i) for i in range(1, 15)], ["15", "16", "17", "18"], ["19", "20"]]
    assert not splits.warnings
    splits = make_splits(f"{path}#id=1-10", f"{path}#id=11-20", f"{path}#id=15")
    assert [s.prompt_id for s in splits.validation.sequences] == ["15"]
    assert len(splits.train.sequences) == 10 and len(splits.evaluation.sequences) == 10
    with pytest.raises(UsageError, match="every validation sequence is a training sequence"):
        make_splits(f"{path}#0-9", f"{path}#10-19", f"{path}#3")
    with pytest.raises(UsageError, match="every evaluation sequence is a training sequence"):
        make_splits(f"{path}#0-9", f"{path}#0-9")  # the same data under another spec is seen through
    partial = make_splits(f"{path}#0-9", f"{path}#9-19")
    assert partial.warnings == ["warning: 1 of 11 evaluation sequences repeat a training sequence ('10')"]
    with pytest.raises(UsageError, match="too few to hold out"):
        make_splits(f"{path}#0,1", None)


def test_model_identity_is_name_and_shape_never_the_file_name() -> None:
    trained = {"name": "mixtral-8x7b", "num_layers": 32, "num_experts": 8, "top_k": 2}
    check_model(trained, ModelSpec(32, 8, 2, 0, name="Mixtral-8x7B"), "x")  # case does not matter
    check_model(trained, ModelSpec(32, 8, 2, 0, name=""), "x")  # an unnamed log of the same shape
    check_model({**trained, "name": ""}, ModelSpec(32, 8, 2, 0, name="humaneval"), "x")
    with pytest.raises(CheckpointError, match="trained for model 'mixtral-8x7b', not for 'qwen'"):
        check_model(trained, ModelSpec(32, 8, 2, 0, name="qwen"), "x")
    with pytest.raises(CheckpointError, match=r"\(32, 8, 2\), but this model has \(26, 64, 6\)"):
        check_model(trained, ModelSpec(26, 64, 6, 0, name="mixtral-8x7b"), "x")


def test_json_text_never_prints_nan() -> None:
    text = json_text([{"gap": math.nan, "nested": {"x": [math.inf, 1.5]}}])
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == [{"gap": None, "nested": {"x": [None, 1.5]}}]


def test_lookahead_rows_only_for_traces_with_lookahead_logits() -> None:
    assert all(prefetch != "lookahead" for _, prefetch in heuristics_for(_trace(2)))
    assert heuristics_for(_trace(2, lookahead=True)) == HEURISTICS


def test_default_ppo_prior_needs_no_shipped_predictor_for_other_models() -> None:
    """Workflow break 2: the default config's predictor prior exists only for tiny-mixtral; elsewhere the run uses
    the features prior and says how to get a predictor prior, before training."""
    from moe_env.agents.ppo import PPOConfig
    from moe_env.agents.ppo_train import resolve_prior

    notes: list[str] = []
    config = PPOConfig(prior="predictor")
    resolve_prior(config, TraceMeta("deepseek-v2-lite", 26, 64, 6, "test"), notes.append)
    assert config.prior == "features" and len(notes) == 1 and "--prior-predictor" in notes[0]
    config = PPOConfig(prior="predictor")
    resolve_prior(config, TraceMeta("tiny-mixtral", 4, 8, 2, "test"), notes.append)
    assert config.prior == "predictor" and len(notes) == 1  # its predictor ships: kept, nothing said
    with pytest.raises(UsageError, match="no such file"):
        resolve_prior(PPOConfig(prior="predictor", prior_predictor="/nonexistent.pt"), TraceMeta("x", 1, 4, 2, "t"),
                      notes.append)  # fmt: skip
