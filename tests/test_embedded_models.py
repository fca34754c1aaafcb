"""The shipped tiny MoE models load with plain transformers and route like a real MoE on held-out text."""

import json

import numpy as np
import pytest

from moe_env.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_model_dir
from moe_env.routing_stats import collect_selections, routing_statistics

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N_FILES = 24  # held-out stdlib files measured per model
N_TOKENS = 256  # tokens per file


def test_embedded_model_dir():
    assert DEFAULT_MODEL in EMBEDDED_MODELS
    for name in EMBEDDED_MODELS:
        d = embedded_model_dir(name)
        assert d.is_dir() and d.name == name
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="tiny-mixtral"):
        embedded_model_dir("nope")


def test_assets_size_budget():
    total = sum(p.stat().st_size for n in EMBEDDED_MODELS for p in embedded_model_dir(n).rglob("*") if p.is_file())
    assert total <= 31 * 1024 * 1024, f"embedded models take {total / 2**20:.1f} MiB"


@pytest.fixture(scope="module", params=EMBEDDED_MODELS)
def loaded(request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = embedded_model_dir(request.param)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    meta = json.loads((d / "train_meta.json").read_text())
    return request.param, model, tok, meta


def test_architecture(loaded):
    name, model, tok, meta = loaded
    cfg = model.config
    if name == "tiny-mixtral":
        assert type(model).__name__ == "MixtralForCausalLM"
        assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)
    else:
        assert type(model).__name__ in ("OlmoeForCausalLM", "Qwen3MoeForCausalLM")
        assert cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 4
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert meta["steps"] > 0 and meta["corpus"]["sha256"]


def test_tokenizer_roundtrip(loaded):
    from moe_env.pretrain import heldout_files, read_text

    _, _, tok, meta = loaded
    assert tok.eos_token is not None and tok.bos_token is not None
    assert tok.eos_token_id is not None and tok.bos_token_id is not None
    sample = "def f(x):\n    return x ** 2  # ünïcödé ✓ 漢字\n\ttab"
    texts = [sample, read_text(heldout_files(meta["config"]["val_every"])[1])]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_heldout_routing_is_realistic(loaded):
    from moe_env.pretrain import encode_files, heldout_files

    _, model, tok, meta = loaded
    files = heldout_files(meta["config"]["val_every"])
    seqs = [s for s in encode_files(tok, files) if len(s) >= 64][:N_FILES]
    sels = collect_selections(model, seqs, max_tokens=N_TOKENS)
    num_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    st = routing_statistics(sels, num_experts)
    assert st.usage_entropy_ratio_min >= 0.93, st.usage_entropy_ratio
    if num_experts == 8:
        assert st.min_expert_share >= 0.025, st.min_expert_share
    assert 1.2 <= st.prev_token_reuse_over_chance <= 2.2, st.prev_token_reuse_per_layer
    assert np.isfinite(st.prev_token_reuse)


def test_generates(loaded):
    _, model, tok, _ = loaded
    ids = tok("import os\n", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
