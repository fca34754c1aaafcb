"""Pre-train the small embedded MoE causal LMs on a corpus every machine has: the Python standard library.

The corpus is the running interpreter's standard-library ``.py`` sources (``sysconfig.get_paths()["stdlib"]``,
without ``site-packages``/``dist-packages`` and without ``test``/``tests`` directories), sorted by relative path.
Every ``val_every``-th file (index ``i % val_every == 0``) is held out for validation; the rest is training text.

A byte-level BPE tokenizer is trained locally with ``tokenizers`` and saved as a transformers fast tokenizer.
The model is a plain transformers MoE class built from a config (``MixtralForCausalLM`` or ``OlmoeForCausalLM``).

Balanced routing. During training only, each router is swapped for a subclass (same parameters, so the state
dict is unchanged) that records its inputs and selections. A *selection balance loss* then pushes the logits of
over-selected experts down and of under-selected experts up, measured on the actual top-k selections of the
batch::

    L_bal = coef * sum_e E * (f_e - 1/E) * mean_t (z_e(t) - mean_j z_j(t)),   z = W_router @ stopgrad(h)

where ``f_e`` is expert e's share of the layer's selections in the batch (a constant). Its gradient only reaches
the router weights, moves them like DeepSeek-V3's bias update (with Adam, roughly ``+/- lr * sign``) but inside
the plain router, so the saved checkpoint routes in a balanced way with no extra bias. An optional selection
bias (DeepSeek-V3 aux-loss-free balancing) can be enabled with ``selection_bias_rate > 0``; it is annealed to
zero over the last ``selection_bias_anneal`` fraction of training so the shipped router does not need it. A
small router z-loss keeps logits bounded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moe_env.errors import UsageError
from moe_env.outputs import check_writable_dir
from moe_env.routing_stats import collect_selections, find_routers, routing_statistics

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


# --------------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Model architecture (``model``: kwargs of the transformers config class) plus training hyper-parameters."""

    name: str
    model_type: str  # "mixtral" or "olmoe"
    model: dict = field(default_factory=dict)
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    balance_coef: float = 0.05
    z_loss_coef: float = 1e-3
    selection_bias_rate: float = 0.0
    selection_bias_anneal: float = 0.2
    val_every: int = 20
    val_windows: int = 64
    stats_files: int = 40
    stats_tokens: int = 256
    log_every: int = 20
    ckpt_every: int = 100
    experts_implementation: str = "eager"
    num_threads: int = 2

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read and check a JSON config: a missing or unreadable file, invalid JSON, unknown or missing keys,
        wrongly typed or out-of-range values raise UsageError naming the file and the field."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--config {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--config {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config {path}: expected a JSON object of training settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"--config {path}: unknown keys {sorted(unknown)}; known: {', '.join(sorted(known))}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f)]
        if missing:
            raise UsageError(f"--config {path}: missing required keys {missing}")
        for name, value in data.items():
            _check_field(name, value, f"--config {path}")
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        config = cls(**data)
        config.check(f"--config {path}")
        return config

    def check(self, where: str = "config") -> None:
        """Value ranges that types alone do not catch (UsageError naming the field)."""
        for name in _POSITIVE_INTS:
            if getattr(self, name) < 1:
                raise UsageError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise UsageError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UsageError(f"{where}: lr must be > 0, got {self.lr}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise UsageError(f"{where}: betas must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("min_lr_ratio", "selection_bias_anneal"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{where}: {name} must be in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_POSITIVE_INTS = ("vocab_size", "seq_len", "batch_size", "steps", "val_every", "val_windows", "stats_files",
                  "stats_tokens", "log_every", "ckpt_every", "num_threads")  # fmt: skip
_NON_NEGATIVE = ("warmup_steps", "weight_decay", "grad_clip", "balance_coef", "z_loss_coef", "selection_bias_rate")
# JSON types of each field (TrainConfig's annotations are strings under `from __future__ import annotations`)
_FIELD_TYPES = {"name": str, "model_type": str, "model": dict, "experts_implementation": str, "betas": tuple,
                "lr": float, "min_lr_ratio": float, "weight_decay": float, "grad_clip": float, "balance_coef": float,
                "z_loss_coef": float, "selection_bias_rate": float, "selection_bias_anneal": float}  # fmt: skip


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_field(name: str, value: object, where: str) -> None:
    kind = _FIELD_TYPES.get(name, int)
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif kind is float:
        ok, expected = _is_number(value), "a number"
    elif kind is tuple:
        ok = isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)
        expected = "a list of two numbers"
    elif kind is dict:
        ok, expected = isinstance(value, dict), "a JSON object"
    else:
        ok, expected = isinstance(value, str) and bool(value), "a non-empty string"
    if not ok:
        raise UsageError(f"{where}: {name} must be {expected}, got {json.dumps(value)}")


# --------------------------------------------------------------------------------------------------- corpus


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Sorted standard-library ``.py`` files, excluding site/dist-packages and test/tests directories."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages", "test", "tests"}
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if excluded.intersection(rel.parts[:-1]):
            continue
        if p.is_file():
            files.append(rel)
    return [root / rel for rel in sorted(files, key=lambda r: r.as_posix())]


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def split_files(files: list[Path], val_every: int = 20) -> tuple[list[Path], list[Path]]:
    """(train, val): file ``i`` is held out when ``i % val_every == 0``."""
    train = [f for i, f in enumerate(files) if i % val_every != 0]
    val = [f for i, f in enumerate(files) if i % val_every == 0]
    return train, val


def heldout_files(val_every: int = 20) -> list[Path]:
    """The validation files of this interpreter's stdlib corpus."""
    return split_files(stdlib_files(), val_every)[1]


def corpus_sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE tokenizer on ``texts`` and save it (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_files(tokenizer, files: list[Path]) -> list[np.ndarray]:
    texts = [read_text(f) for f in files]
    enc = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in enc]


def concat_with_eos(seqs: list[np.ndarray], eos_id: int) -> np.ndarray:
    parts = []
    for s in seqs:
        parts.append(s)
        parts.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ---------------------------------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM

    classes = {"mixtral": (MixtralConfig, MixtralForCausalLM), "olmoe": (OlmoeConfig, OlmoeForCausalLM)}
    if cfg.model_type not in classes:
        raise ValueError(f"unknown model_type {cfg.model_type!r}; known: {sorted(classes)}")
    config_cls, model_cls = classes[cfg.model_type]
    kwargs = dict(cfg.model)
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("output_router_logits", False)
    config = config_cls(**kwargs)
    torch.manual_seed(cfg.seed)
    model = model_cls(config)
    if cfg.experts_implementation != "eager":
        model.set_experts_implementation(cfg.experts_implementation)
    return model.float()


def plain_copy(model):
    """A fresh instance of the model's class with the same weights (training-time router swaps removed)."""
    fresh = type(model)(model.config)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    # tied embeddings may show up as missing lm_head; anything else is a bug
    bad = [k for k in missing if not k.startswith("lm_head")] + list(unexpected)
    if bad:
        raise RuntimeError(f"state dict mismatch: {bad}")
    fresh.tie_weights()
    return fresh


_TRAIN_ROUTER_CLASSES: dict[type, type] = {}


def _train_router_class(base: type) -> type:
    """Subclass of a transformers TopKRouter that records inputs/selections and supports a selection bias."""
    if base in _TRAIN_ROUTER_CLASSES:
        return _TRAIN_ROUTER_CLASSES[base]

    class TrainRouter(base):
        def forward(self, hidden_states):
            h = hidden_states.reshape(-1, self.hidden_dim)
            logits = F.linear(h, self.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            if self.selection_bias_scale > 0:
                sel_score = logits.detach().float() + self.selection_bias_scale * self.selection_bias
                idx = torch.topk(sel_score, self.top_k, dim=-1).indices
            else:
                idx = torch.topk(probs, self.top_k, dim=-1).indices
            top = probs.gather(-1, idx)
            if getattr(self, "norm_topk_prob", True):
                top = top / top.sum(dim=-1, keepdim=True)
            self.record = (h, logits, idx)
            return logits, top.to(logits.dtype), idx

    TrainRouter.__name__ = f"Train{base.__name__}"
    _TRAIN_ROUTER_CLASSES[base] = TrainRouter
    return TrainRouter


def install_train_routers(model) -> list:
    routers = find_routers(model)
    for r in routers:
        r.__class__ = _train_router_class(type(r))
        r.register_buffer("selection_bias", torch.zeros(r.num_experts), persistent=False)
        r.selection_bias_scale = 0.0
        r.record = None
    return routers


def router_losses(routers, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(balance loss, z-loss, per-layer selection counts [L, E]) from the routers' last forward."""
    bal = torch.zeros(())
    zl = torch.zeros(())
    counts = []
    for r in routers:
        h, logits, idx = r.record
        num_experts = r.num_experts
        cnt = torch.bincount(idx.reshape(-1), minlength=num_experts).float()
        counts.append(cnt.numpy())
        frac = cnt / cnt.sum()
        z = F.linear(h.detach(), r.weight)
        z = z - z.mean(dim=-1, keepdim=True)
        bal = bal + (num_experts * (frac - 1.0 / num_experts) * z.mean(dim=0)).sum()
        zl = zl + torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        r.record = None
    n = max(len(routers), 1)
    return bal / n, zl / n, np.stack(counts)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------ training


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict:
    """The training checkpoint, whole, or UsageError (a torn or foreign file is refused, never half-loaded)."""
    try:
        ck = torch.load(path, weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError... on a torn file
        raise UsageError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}); delete it") from None
    needed = {"model", "optimizer", "selection_bias", "step", "elapsed", "rng"}
    lacking = sorted(needed - set(ck)) if isinstance(ck, dict) else sorted(needed)
    if lacking:
        raise UsageError(f"--resume: {path} is not a pretrain checkpoint (it lacks {', '.join(lacking)})")
    return ck


def prepare_data(cfg: TrainConfig, run_dir: Path, log=print):
    """Corpus files, tokenizer (trained once, cached in run_dir/tokenizer) and token streams."""
    files = stdlib_files()
    train_files, val_files = split_files(files, cfg.val_every)
    corpus_hash = corpus_sha256(files)
    tok_dir = run_dir / "tokenizer"
    meta_path = run_dir / "data_meta.json"
    if tok_dir.exists() and meta_path.exists() and json.loads(meta_path.read_text())["corpus_sha256"] == corpus_hash:
        tokenizer = load_tokenizer(tok_dir)
    else:
        t0 = time.time()
        tokenizer = train_tokenizer([read_text(f) for f in train_files], cfg.vocab_size, tok_dir)
        _atomic_write_text(meta_path, json.dumps({"corpus_sha256": corpus_hash}))
        log(f"trained tokenizer (vocab {len(tokenizer)}) in {time.time() - t0:.1f}s")
    eos = tokenizer.eos_token_id
    train_ids = concat_with_eos(encode_files(tokenizer, train_files), eos)
    val_seqs = encode_files(tokenizer, val_files)
    return {
        "files": files,
        "train_files": train_files,
        "val_files": val_files,
        "corpus_sha256": corpus_hash,
        "tokenizer": tokenizer,
        "train_ids": torch.from_numpy(train_ids.astype(np.int64)),
        "val_ids": torch.from_numpy(concat_with_eos(val_seqs, eos).astype(np.int64)),
        "val_seqs": val_seqs,
    }


def sample_batch(ids: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model, val_ids: torch.Tensor, cfg: TrainConfig) -> float:
    model.eval()
    n = min(cfg.val_windows, (val_ids.numel() - 1) // cfg.seq_len)
    total, count = 0.0, 0
    for i in range(0, n, cfg.batch_size):
        rows = [val_ids[j * cfg.seq_len : (j + 1) * cfg.seq_len] for j in range(i, min(n, i + cfg.batch_size))]
        batch = torch.stack(rows)
        out = model(input_ids=batch, labels=batch, use_cache=False)
        total += out.loss.item() * len(rows)
        count += len(rows)
    model.train()
    return total / max(count, 1)


def heldout_routing_stats(model, val_seqs: list[np.ndarray], cfg_or_files: int, tokens: int) -> dict:
    seqs = [s for s in val_seqs if len(s) >= 16][:cfg_or_files]
    sels = collect_selections(model, seqs, max_tokens=tokens)
    num_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    return routing_statistics(sels, num_experts).to_dict()


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    resume: bool = False,
    log=print,
    stop_after: int | None = None,
):
    """Train (or resume) and save the final plain HF model + tokenizer + train_meta.json to ``out_dir``.

    ``stop_after``: checkpoint and return ``None`` once that many steps are done (simulates an interruption).
    """
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    cfg.check()
    if stop_after is not None and stop_after < 1:
        raise UsageError(f"stop_after must be >= 1, got {stop_after}")
    ckpt_path = run_dir / "checkpoint.pt"
    if resume and not ckpt_path.is_file():  # never a silent fresh start of a long run
        raise UsageError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start from scratch")
    check_writable_dir(out_dir, "--out")
    check_writable_dir(run_dir, "--run-dir")
    ck = _load_checkpoint(ckpt_path) if resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    data = prepare_data(cfg, run_dir, log)
    tokenizer = data["tokenizer"]
    log(
        f"corpus: {len(data['files'])} files ({len(data['train_files'])} train / {len(data['val_files'])} val), "
        f"{data['train_ids'].numel()} train tokens, sha256 {data['corpus_sha256'][:16]}"
    )
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {type(model).__name__}: {n_params / 1e6:.2f}M params")
    routers = install_train_routers(model)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    if ck is not None:
        model.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        for r, b in zip(routers, ck["selection_bias"], strict=True):
            r.selection_bias.copy_(b)
        step, elapsed = ck["step"], ck["elapsed"]
        gen.set_state(ck["rng"]["data"])
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        log(f"resumed from {ckpt_path} at step {step}")

    def save_checkpoint():
        _atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "selection_bias": [r.selection_bias.clone() for r in routers],
                "step": step,
                "elapsed": elapsed,
                "config": cfg.to_dict(),
                "rng": {
                    "data": gen.get_state(),
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            },
            ckpt_path,
        )

    model.train()
    t_log, s_log = time.time(), step
    anneal_start = int(cfg.steps * (1 - cfg.selection_bias_anneal))
    try:
        while step < cfg.steps:
            t0 = time.time()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            if cfg.selection_bias_rate > 0:
                scale = 1.0 if step < anneal_start else max(0.0, (cfg.steps - step) / max(1, cfg.steps - anneal_start))
                for r in routers:
                    r.selection_bias_scale = scale
            batch = sample_batch(data["train_ids"], cfg, gen)
            out = model(input_ids=batch, labels=batch, use_cache=False)
            bal, zl, counts = router_losses(routers, cfg)
            loss = out.loss + cfg.balance_coef * bal + cfg.z_loss_coef * zl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if cfg.selection_bias_rate > 0:
                with torch.no_grad():
                    for r, c in zip(routers, counts, strict=True):
                        load = torch.from_numpy(c)
                        r.selection_bias += cfg.selection_bias_rate * torch.sign(load.mean() - load)
            step += 1
            elapsed += time.time() - t0
            if step % cfg.log_every == 0 or step == cfg.steps:
                shares = counts / counts.sum(axis=1, keepdims=True)
                ent = -(np.where(shares > 0, shares * np.log(np.maximum(shares, 1e-12)), 0)).sum(1)
                ent_ratio = ent / math.log(counts.shape[1])
                now = time.time()
                log(
                    f"step {step:5d}/{cfg.steps} loss {out.loss.item():.4f} bal {bal.item():+.4f} "
                    f"z {zl.item():.2f} lr {lr_at(step - 1, cfg):.2e} "
                    f"batch-usage ent_min {ent_ratio.min():.3f} share_min {shares.min():.4f} "
                    f"{(step - s_log) / (now - t_log):.2f} step/s elapsed {elapsed:.0f}s"
                )
                t_log, s_log = now, step
            if step % cfg.ckpt_every == 0 or step == cfg.steps or (stop_after is not None and step >= stop_after):
                save_checkpoint()
            if stop_after is not None and step >= stop_after and step < cfg.steps:
                log(f"stopping after step {step}; checkpoint in {ckpt_path}")
                return None
    except KeyboardInterrupt:
        log(f"interrupted at step {step}; the last checkpoint in {ckpt_path} is kept (resume with --resume)")
        raise

    return finalize(cfg, model, data, out_dir, step, elapsed, log)


def finalize(cfg: TrainConfig, model, data: dict, out_dir: Path, step: int, elapsed: float, log=print) -> dict:
    """Save the plain HF model + tokenizer, then measure it as loaded from disk and write train_meta.json."""
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    plain = plain_copy(model)
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    data["tokenizer"].save_pretrained(str(out_dir))
    loaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    val_loss = validation_loss(loaded, data["val_ids"], cfg)
    stats = heldout_routing_stats(loaded, data["val_seqs"], cfg.stats_files, cfg.stats_tokens)
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    meta = {
        "name": cfg.name,
        "model_class": type(loaded).__name__,
        "num_parameters": sum(p.numel() for p in loaded.parameters()),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "steps": step,
        "train_wall_time_s": round(elapsed, 1),
        "final_val_loss": val_loss,
        "routing_stats_heldout": stats,
        "corpus": {
            "source": "python stdlib .py sources (no site-packages, test/ or tests/ dirs), sorted by relative path",
            "python_version": sys.version.split()[0],
            "num_files": len(data["files"]),
            "num_val_files": len(data["val_files"]),
            "val_rule": f"file index i % {cfg.val_every} == 0",
            "sha256": data["corpus_sha256"],
            "train_tokens": int(data["train_ids"].numel()),
        },
        "torch_version": torch.__version__,
        "asset_bytes": size,
    }
    _atomic_write_text(out_dir / "train_meta.json", json.dumps(meta, indent=2) + "\n")
    log(f"saved {out_dir} ({size / 1e6:.1f} MB); final val loss {val_loss:.4f}; wall {elapsed:.0f}s")
    log(
        "held-out routing: usage_entropy_ratio_min {usage_entropy_ratio_min:.4f} min_expert_share "
        "{min_expert_share:.4f} prev_token_reuse_over_chance {prev_token_reuse_over_chance:.3f}".format(**stats)
    )
    log("per-layer usage entropy ratio: " + ", ".join(f"{x:.3f}" for x in stats["usage_entropy_ratio"]))
    log("per-layer prev-token reuse: " + ", ".join(f"{x:.3f}" for x in stats["prev_token_reuse_per_layer"]))
    return meta
