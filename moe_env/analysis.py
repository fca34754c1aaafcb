"""Statistics of expert activation traces (what `moe-env analyze` reports), computed from decode routing.

Per-layer quantities use each layer's own sequence of present cells (absent cells are skipped), so a converted
log whose layers lost records (shifted token indices) still gives exact per-layer figures; cross-layer ones
(affinity, lookahead against the next layer) pair cells by decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_env.sim_kernels import layer_events, lru_kernel
from moe_env.trace import Trace


def layer_rows(trace: Trace, layer: int) -> list[np.ndarray]:
    """Per sequence, the present decode cells of `layer`: [n, k] expert ids in step order."""
    out = []
    for seq in trace.sequences:
        rows = seq.experts[:, layer]
        out.append(rows[rows[:, 0] >= 0].astype(np.int64))
    return out


def expert_usage(trace: Trace) -> np.ndarray:
    """[L, E] decode accesses per expert."""
    meta = trace.meta
    usage = np.zeros((meta.num_layers, meta.num_experts), dtype=np.int64)
    for layer in range(meta.num_layers):
        for rows in layer_rows(trace, layer):
            usage[layer] += np.bincount(rows.reshape(-1), minlength=meta.num_experts)
    return usage


def weight_share(trace: Trace) -> np.ndarray | None:
    """[L, E] share of each layer's routing weight carried by each expert; None when the trace lacks weights."""
    if any(seq.weights is None for seq in trace.sequences):
        return None
    meta = trace.meta
    total = np.zeros((meta.num_layers, meta.num_experts), dtype=np.float64)
    for seq in trace.sequences:
        present = seq.experts[:, :, 0] >= 0
        for layer in range(meta.num_layers):
            rows, weights = seq.experts[present[:, layer], layer], seq.weights[present[:, layer], layer]
            np.add.at(total[layer], rows.reshape(-1).astype(np.int64), np.nan_to_num(weights.reshape(-1)))
    sums = total.sum(axis=1, keepdims=True)
    return np.divide(total, sums, out=np.zeros_like(total), where=sums > 0)


def usage_entropy(usage: np.ndarray) -> np.ndarray:
    """[L] entropy of each layer's usage distribution over log(E): 1.0 is uniform."""
    share = usage / np.maximum(usage.sum(axis=1, keepdims=True), 1)
    logs = np.log(np.where(share > 0, share, 1.0))
    return -(share * logs).sum(axis=1) / np.log(usage.shape[1])


def reuse_distances(trace: Trace) -> np.ndarray:
    """Per decode access, the tokens since the same expert of the same layer was last routed (0 = first use)."""
    out: list[int] = []
    for layer in range(trace.meta.num_layers):
        for rows in layer_rows(trace, layer):
            last: dict[int, int] = {}
            for i, row in enumerate(rows.tolist()):
                for expert in row:
                    out.append(i - last[expert] if expert in last else 0)
                    last[expert] = i
    return np.asarray(out, dtype=np.int64)


def window_reuse(distances: np.ndarray, max_window: int = 16) -> np.ndarray:
    """[W] share of accesses whose expert was routed by the same layer within the previous W tokens, W=1..max."""
    reused = distances[distances > 0]
    total = max(len(distances), 1)
    return np.asarray([(reused <= w).sum() / total for w in range(1, max_window + 1)])


def affinity(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(P, n): P[l, i, j] = P(expert j at layer l+1 | expert i at layer l) over the same decode steps, n[l, i] = the
    steps where i was routed at l (with l+1 present). Rows of P sum to top_k; chance is top_k / E."""
    meta = trace.meta
    L, E = meta.num_layers, meta.num_experts
    counts = np.zeros((max(L - 1, 0), E, E), dtype=np.float64)
    seen = np.zeros((max(L - 1, 0), E), dtype=np.float64)
    for seq in trace.sequences:
        present = seq.experts[:, :, 0] >= 0
        for layer in range(L - 1):
            both = present[:, layer] & present[:, layer + 1]
            src = seq.experts[both, layer].astype(np.int64)
            dst = seq.experts[both, layer + 1].astype(np.int64)
            k = src.shape[1]
            np.add.at(counts[layer], (np.repeat(src, k, axis=1).reshape(-1), np.tile(dst, (1, k)).reshape(-1)), 1.0)
            np.add.at(seen[layer], src.reshape(-1), 1.0)
    probs = np.divide(counts, seen[:, :, None], out=np.zeros_like(counts), where=seen[:, :, None] > 0)
    return probs, seen


def lru_flags(trace: Trace, layer: int, capacity: int, sequence: int = 0) -> np.ndarray:
    """[n, k] hit flags (1 hit, 0 miss) of one sequence's decode accesses at `layer` under LRU with `capacity`."""
    seq = trace.sequences[sequence]
    prefill, decode = layer_events(seq, layer, capacity)
    flags = bytearray()
    lru_kernel(prefill + decode, capacity, trace.meta.num_experts, flags)
    skip = sum(len(e) for e in prefill)
    return np.frombuffer(bytes(flags[skip:]), dtype=np.uint8).reshape(-1, trace.meta.top_k)


@dataclass
class LookaheadQuality:
    """Per layer l (predicting l+1): top-k of the lookahead logits against the experts l+1 actually routed."""

    precision_at_k: np.ndarray  # [L-1] |top-k ∩ actual| / k  (= recall at k: both sets have k experts)
    recall_at_2k: np.ndarray  # [L-1] |top-2k ∩ actual| / k
    chance: float


def lookahead_quality(trace: Trace) -> LookaheadQuality | None:
    """None when the trace has no lookahead logits (e.g. converted routing logs)."""
    if any(seq.lookahead_logits is None for seq in trace.sequences):
        return None
    meta = trace.meta
    k, L = meta.top_k, meta.num_layers
    hit_k, hit_2k, cells = np.zeros(L - 1), np.zeros(L - 1), np.zeros(L - 1)
    for seq in trace.sequences:
        present = seq.experts[:, :, 0] >= 0
        for layer in range(L - 1):
            both = present[:, layer] & present[:, layer + 1]
            logits = np.nan_to_num(seq.lookahead_logits[both, layer], nan=-np.inf)
            ranked = np.argsort(-logits, axis=1, kind="stable")
            actual = seq.experts[both, layer + 1].astype(np.int64)
            for top, acc in ((ranked[:, :k], hit_k), (ranked[:, : 2 * k], hit_2k)):
                acc[layer] += (top[:, :, None] == actual[:, None, :]).any(axis=1).sum()
            cells[layer] += both.sum()
    denom = np.maximum(cells * k, 1)
    return LookaheadQuality(hit_k / denom, hit_2k / denom, k / meta.num_experts)


def confidence_vs_hits(trace: Trace, capacity: int, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(bin centres, LRU hit rate per bin, accesses per bin) of decode accesses grouped by their cell's top-1
    routing weight (the gate's confidence); None without weights."""
    if any(seq.weights is None for seq in trace.sequences):
        return None
    top1, hits = [], []
    for s, seq in enumerate(trace.sequences):
        for layer in range(trace.meta.num_layers):
            rows = seq.experts[:, layer, 0] >= 0
            flags = lru_flags(trace, layer, capacity, s)
            top1.append(np.repeat(np.nanmax(seq.weights[rows, layer], axis=1), trace.meta.top_k))
            hits.append(flags.reshape(-1))
    x, y = np.concatenate(top1), np.concatenate(hits).astype(np.float64)
    edges = np.linspace(x.min(), x.max() + 1e-9, bins + 1)
    which = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    rate = np.divide(np.bincount(which, weights=y, minlength=bins), count, out=np.full(bins, np.nan), where=count > 0)
    return (edges[:-1] + edges[1:]) / 2, rate, count


@dataclass
class PruningCandidate:
    layer: int
    expert: int
    usage_share: float
    weight_share: float | None


def pruning_candidates(usage: np.ndarray, weights: np.ndarray | None, per_layer: int) -> list[PruningCandidate]:
    """The `per_layer` least-used experts of each layer, with the share of accesses and of routing weight."""
    share = usage / np.maximum(usage.sum(axis=1, keepdims=True), 1)
    out = []
    for layer in range(usage.shape[0]):
        for expert in np.argsort(usage[layer], kind="stable")[:per_layer]:
            w = None if weights is None else float(weights[layer, expert])
            out.append(PruningCandidate(layer, int(expert), float(share[layer, expert]), w))
    return out


# ------------------------------------------------------------------------------------------------ the report


@dataclass
class ReportOptions:
    capacity: int  # LRU slots per layer for the hit/miss figures
    layer_pair: int  # the affinity heatmap shows layer_pair -> layer_pair + 1
    timeline_layers: tuple[int, ...]
    pruning_per_layer: int = 2


def default_options(trace: Trace, capacity: int | None = None, layer_pair: int | None = None) -> ReportOptions:
    meta = trace.meta
    capacity = capacity if capacity is not None else max(meta.top_k, meta.num_experts // 2)
    layer_pair = layer_pair if layer_pair is not None else max(0, (meta.num_layers - 2) // 2)
    layers = tuple(sorted({0, meta.num_layers // 2, meta.num_layers - 1}))
    return ReportOptions(capacity, layer_pair, layers, max(1, meta.num_experts // 8))


def _figure(width: float = 6, height: float = 4):
    from matplotlib.figure import Figure  # rendered by Figure.savefig (Agg): no pyplot, no global state

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def _save(fig, out_dir, name: str) -> str:
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    return name


def write_report(trace: Trace, out_dir, options: ReportOptions, title: str) -> list[str]:
    """Write report.md and its PNG figures into `out_dir`; returns the files written."""
    from pathlib import Path

    from matplotlib.colors import ListedColormap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    if not meta.top_k <= options.capacity <= E:
        from moe_env.errors import UsageError

        raise UsageError(f"--cache-slots {options.capacity} outside {k}..{E}")
    if not 0 <= options.layer_pair < max(L - 1, 1):
        from moe_env.errors import UsageError

        raise UsageError(f"--layer-pair {options.layer_pair} outside 0..{max(L - 2, 0)}")
    files: list[str] = []
    md: list[str] = [f"# Trace report: {title}", ""]
    md.append(
        f"Model `{meta.model}` ({meta.source}): {L} MoE layers, {E} experts, top-{k}; {len(trace.sequences)} "
        f"sequences, {trace.num_steps} decode steps, {trace.num_accesses} decode expert accesses."
    )
    if meta.source.startswith("convert"):
        md.append("Converted log: per-layer figures are exact; cross-layer pairing by step may be approximate.")
    md.append("")

    usage = expert_usage(trace)
    entropy = usage_entropy(usage)
    fig, ax = _figure(7, 0.25 * L + 1.5)
    share = usage / np.maximum(usage.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("share of each layer's decode accesses")
    fig.colorbar(image, ax=ax)
    files.append(_save(fig, out, "usage-heatmap.png"))
    fig, ax = _figure()
    ax.plot(range(L), entropy, marker="o")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("usage entropy / log(E)")
    files.append(_save(fig, out, "usage-entropy.png"))
    md += ["## Expert usage", "", "![usage](usage-heatmap.png) ![entropy](usage-entropy.png)", ""]
    md.append(
        f"Usage entropy / log(E): min {entropy.min():.3f} (layer {int(entropy.argmin())}), mean "
        f"{entropy.mean():.3f}, max {entropy.max():.3f}. Busiest expert share: {share.max():.3f} "
        f"(uniform: {1 / E:.3f})."
    )
    md.append("")

    distances = reuse_distances(trace)
    reused = distances[distances > 0]
    fig, ax = _figure()
    if len(reused):
        ax.hist(reused, bins=np.arange(1, min(int(reused.max()), 64) + 2) - 0.5, density=True)
    ax.set_xlabel("tokens since the same expert was last routed by the layer")
    ax.set_ylabel("share of reuses")
    files.append(_save(fig, out, "reuse-distance.png"))
    windows = window_reuse(distances)
    fig, ax = _figure()
    ax.plot(range(1, len(windows) + 1), windows, marker="o", label="trace")
    chance = [1 - (1 - k / E) ** w for w in range(1, len(windows) + 1)]
    ax.plot(range(1, len(windows) + 1), chance, linestyle="--", label="independent uniform routing")
    ax.set_xlabel("window W (tokens)")
    ax.set_ylabel("share of accesses reused within W")
    ax.legend()
    files.append(_save(fig, out, "window-reuse.png"))
    md += ["## Reuse", "", "![reuse distance](reuse-distance.png) ![window reuse](window-reuse.png)", ""]
    if len(reused):
        md.append(
            f"Median reuse distance {np.median(reused):.0f} tokens; {np.mean(distances == 0):.1%} of accesses are "
            f"an expert's first use in its sequence."
        )
    md.append("")
    md.append("| W | " + " | ".join(str(w) for w in (1, 2, 4, 8, 16)) + " |")
    md.append("|---|" + "---|" * 5)
    md.append("| reused within W | " + " | ".join(f"{windows[w - 1]:.3f}" for w in (1, 2, 4, 8, 16)) + " |")
    md.append("| chance | " + " | ".join(f"{chance[w - 1]:.3f}" for w in (1, 2, 4, 8, 16)) + " |")
    md.append("")

    md += ["## Inter-layer affinity", ""]
    if L > 1:
        probs, seen = affinity(trace)
        pair = options.layer_pair
        fig, ax = _figure(5.5, 4.5)
        image = ax.imshow(probs[pair], cmap="magma", vmin=0, vmax=1)
        ax.set_xlabel(f"expert j at layer {pair + 1}")
        ax.set_ylabel(f"expert i at layer {pair}")
        ax.set_title("P(j at l+1 | i at l)")
        fig.colorbar(image, ax=ax)
        files.append(_save(fig, out, "affinity-heatmap.png"))
        max_cond = probs.max(axis=(1, 2))
        weighted = (probs.max(axis=2) * seen).sum(axis=1) / np.maximum(seen.sum(axis=1), 1)
        fig, ax = _figure()
        ax.plot(range(L - 1), max_cond, marker="o", label="max over (i, j)")
        ax.plot(range(L - 1), weighted, marker="s", label="mean over i of max_j (usage-weighted)")
        ax.axhline(k / E, linestyle="--", color="gray", label="chance k/E")
        ax.set_xlabel("layer l (predicting l+1)")
        ax.set_ylabel("conditional probability")
        ax.legend(fontsize=8)
        files.append(_save(fig, out, "affinity-summary.png"))
        md += ["![affinity](affinity-heatmap.png) ![summary](affinity-summary.png)", ""]
        md.append(
            f"Best predictor per layer, P(j | i) maximised over j and averaged over i by usage: mean "
            f"{weighted.mean():.3f} over layers (chance {k / E:.3f}); strongest single pair {max_cond.max():.3f} "
            f"(layer {int(max_cond.argmax())})."
        )
    else:
        md.append("One MoE layer: no layer pair.")
    md.append("")

    md += [f"## LRU hit/miss timeline ({options.capacity} slots per layer, first sequence)", ""]
    cmap = ListedColormap(["#f2f2f2", "#2c7bb6", "#d7191c"])
    for layer in options.timeline_layers:
        flags = lru_flags(trace, layer, options.capacity)
        rows = layer_rows(trace, layer)[0]
        grid = np.zeros((len(rows), E), dtype=np.int8)
        for i, (row, hit) in enumerate(zip(rows.tolist(), flags.tolist(), strict=True)):
            for expert, h in zip(row, hit, strict=True):
                grid[i, expert] = 1 if h else 2
        fig, ax = _figure(7, 2.2)
        ax.imshow(grid.T, aspect="auto", cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_xlabel("decode token")
        ax.set_ylabel("expert")
        ax.set_title(f"layer {layer}: blue hit, red miss (hit rate {flags.mean():.3f})", fontsize=9)
        files.append(_save(fig, out, f"lru-timeline-layer{layer}.png"))
        md.append(f"![layer {layer}](lru-timeline-layer{layer}.png)")
    md.append("")

    md += ["## Gate lookahead (next layer's gate on this layer's input)", ""]
    quality = lookahead_quality(trace)
    if quality is None:
        md.append("Lookahead logits: absent in this trace.")
    else:
        fig, ax = _figure()
        ax.plot(range(L - 1), quality.precision_at_k, marker="o", label="precision = recall at k")
        ax.plot(range(L - 1), quality.recall_at_2k, marker="s", label="recall at 2k")
        ax.axhline(quality.chance, linestyle="--", color="gray", label="chance k/E")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("layer l (predicting l+1)")
        ax.legend(fontsize=8)
        files.append(_save(fig, out, "lookahead.png"))
        md += ["![lookahead](lookahead.png)", ""]
        md.append(
            f"Top-{k} of the lookahead logits hit {quality.precision_at_k.mean():.3f} of the next layer's experts "
            f"on average (recall at {2 * k}: {quality.recall_at_2k.mean():.3f}; chance {quality.chance:.3f})."
        )
    md.append("")

    md += [f"## Gate confidence against LRU hits ({options.capacity} slots)", ""]
    confidence = confidence_vs_hits(trace, options.capacity)
    if confidence is None:
        md.append("Routing weights: absent in this trace.")
    else:
        centres, rate, count = confidence
        fig, ax = _figure()
        ax.plot(centres, rate, marker="o")
        ax.set_xlabel("top-1 routing weight of the token's cell")
        ax.set_ylabel("LRU hit rate of its accesses")
        files.append(_save(fig, out, "confidence-vs-hits.png"))
        md += [
            "![confidence](confidence-vs-hits.png)",
            "",
            "| top-1 weight | accesses | LRU hit rate |",
            "|---|---|---|",
        ]
        md += [f"| {c:.2f} | {n} | {r:.3f} |" for c, r, n in zip(centres, rate, count, strict=True) if n]
    md.append("")

    md += ["## Pruning candidates (least-used experts per layer)", ""]
    candidates = pruning_candidates(usage, weight_share(trace), options.pruning_per_layer)
    md += ["| layer | expert | share of accesses | share of routing weight |", "|---|---|---|---|"]
    for c in candidates:
        weight = "absent" if c.weight_share is None else f"{c.weight_share:.4f}"
        md.append(f"| {c.layer} | {c.expert} | {c.usage_share:.4f} | {weight} |")
    md.append("")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return ["report.md", *files]
