"""kvcompress's table (docs/predecessors.md §B): its eight methods at cache sizes 512 and 1024 on one PG-essay stream.

Per configuration:

- **PPL and next-token accuracy** over the first ``num_eval_tokens`` tokens of the stream (kvcompress: 2,000 of
  PG-19), fed through the patched model ``chunk`` tokens at a time (``prefill_chunk_size``): after every chunk the
  cache is compressed back to the method's budget, so every token is predicted from a bounded cache (at most
  ``C + chunk`` slots while a chunk is attended);
- **the real KV size**: mean tokens per layer and KV head at the end of the stream (and the bytes held);
- **TTFT, TPOT and throughput**: :func:`kvfactory.benchmarks.speed.compare` on a ``speed_prompt``-token prompt,
  generating ``new_tokens`` with the cache held at ``C`` (``decode_budget``), round-robin in one run.

The command line is ``python -m benchmarks.kvcompress_table --help`` (``benchmarks/kvcompress_table.py``);
``scripts/predecessors/kvcompress.sh`` runs the table and its figures (methods compared at each size, the
PPL-vs-KV-size trade-off, the normalised summary heatmap, cache efficiency).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from kvfactory.benchmarks.speed import MethodSpec

logger = logging.getLogger(__name__)

METHODS = ("baseline", "recent_only", "streaming_llm", "h2o_l2", "snapkv_lite", "pyramid_kv", "adaptive_l2",
           "fix_size_l2")


def pyramid_budgets(base_size: int, layer_decay: float, num_layers: int, floor: int = 8) -> list[int]:
    """kvcompress's ``pyramid`` profile: layer ``i`` keeps ``base_size · layer_decay^i`` (at least ``floor``)."""
    return [max(floor, round(base_size * layer_decay**i)) for i in range(num_layers)]


def method_spec(name: str, size: int, num_layers: int, layer_decay: float = 0.985) -> MethodSpec:
    """kvcompress's method ``name`` at cache size ``size`` as a kvfactory method and parameters."""
    if name == "baseline":
        return MethodSpec("fullkv", {}, "baseline")
    heavy = size // 8  # h2o_l2: 4 sinks + size/8 lowest-norm heavy hitters + recent (4 + 64 + 444 at 512)
    table: dict[str, tuple[str, dict[str, Any]]] = {
        "recent_only": ("recent_only", {"max_capacity_prompt": size}),
        "streaming_llm": ("streamingllm", {"max_capacity_prompt": size, "sink_size": 4}),
        "h2o_l2": ("h2o_l2", {"max_capacity_prompt": size, "sink_size": 4, "window_size": size - 4 - heavy}),
        "snapkv_lite": ("snapkv_lite", {"max_capacity_prompt": size, "window_size": 32}),
        # pyramid: per-layer budgets base_size · decay^i with SnapKV-lite's votes
        "pyramid_kv": ("snapkv_lite", {"max_capacity_prompt": pyramid_budgets(size, layer_decay, num_layers),
                                       "window_size": 32}),
        "adaptive_l2": ("adaptive_l2", {"max_capacity_prompt": size}),
        "fix_size_l2": ("fix_size_l2", {"max_capacity_prompt": size, "keep_ratio": 0.2, "skip_layers": []}),
    }
    if name not in table:
        raise ValueError(f"unknown kvcompress method {name!r}; accepted: {', '.join(METHODS)}")
    method, params = table[name]
    return MethodSpec(method, params, f"{name}@{size}")


@torch.no_grad()
def stream_quality(model: Any, tokens: Sequence[int], spec: MethodSpec, chunk: int) -> dict[str, float]:
    """PPL, next-token accuracy, final kept tokens (mean per layer and KV head) and cache bytes of ``spec`` over the
    stream, fed ``chunk`` tokens at a time with compression after each chunk."""
    import kvfactory

    device = next(model.parameters()).device
    ids = torch.tensor([list(tokens)], device=device)
    params = dict(spec.params)
    if spec.method != "fullkv":
        params["prefill_chunk_size"] = chunk
    nll, correct, scored = 0.0, 0, 0
    with kvfactory.patch(model, spec.method, **params) as handle:
        cache = handle.new_cache()
        hidden = model.base_model(ids, past_key_values=cache, use_cache=True).last_hidden_state
        head = model.get_output_embeddings()
        for start in range(0, ids.shape[1] - 1, 256):
            stop = min(start + 256, ids.shape[1] - 1)
            logits = head(hidden[:, start:stop]).float()[0]
            targets = ids[0, start + 1 : stop + 1]
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            scored += stop - start
        kept = sum(cache.mean_kept_tokens()) / cache.num_layers
        return {"ppl": math.exp(nll / scored), "next_token_acc": correct / scored, "kv_tokens": kept,
                "kv_bytes": float(cache.nbytes()), "scored_tokens": scored}


def run(model: Any, tokens: Sequence[int], sizes: Sequence[int], *, chunk: int, speed_prompt: int, new_tokens: int,
        repeats: int, warmup: int, methods: Sequence[str] = METHODS, speed: bool = True) -> list[dict[str, Any]]:
    """The table's rows: one per method and size (the baseline once), quality then (optionally) speed."""
    from kvfactory.benchmarks.speed import compare

    layers = model.config.num_hidden_layers
    specs = [method_spec("baseline", 0, layers)] + [method_spec(m, size, layers) for size in sizes for m in methods
                                                    if m != "baseline"]
    rows = []
    for spec in specs:
        size = None if spec.method == "fullkv" else int(spec.label.rsplit("@", 1)[1])
        logger.info("quality of %s", spec.label)
        rows.append({"label": spec.label, "method": spec.label.split("@")[0], "cache_size": size,
                     "kv_method": spec.method, **stream_quality(model, tokens, spec, chunk)})
    if speed:
        prompt = torch.tensor([list(tokens[:speed_prompt])], device=next(model.parameters()).device)
        timed = [MethodSpec(s.method, dict(s.params, decode_budget=_decode_budget(s)) if s.method != "fullkv"
                            else {}, s.label) for s in specs]
        for row, result in zip(rows, compare(model, prompt, timed, new_tokens=new_tokens, repeats=repeats,
                                             warmup=warmup, track_memory=False)):
            row.update(ttft_seconds=result.ttft_seconds, tpot_seconds=result.tpot_seconds,
                       throughput_tokens_per_second=result.throughput_tokens_per_second)
    return rows


def _decode_budget(spec: MethodSpec) -> int:
    budget = spec.params["max_capacity_prompt"]
    return max(budget) if isinstance(budget, list) else budget


def _save(figure: Any, path: Path) -> Path:
    """Lay out, write at 120 dpi and close ``figure``; returns ``path``."""
    from kvfactory.benchmarks.efficiency_plots import _pyplot

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def plot_table(rows: Sequence[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """kvcompress's figures: methods compared at each size (bars), PPL against the KV size (trade-off), the
    normalised methods × metrics heatmap, and cache efficiency (PPL increase per token of KV saved)."""
    from kvfactory.benchmarks.efficiency_plots import _pyplot

    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    baseline = next(r for r in rows if r["cache_size"] is None)
    sizes = sorted({r["cache_size"] for r in rows if r["cache_size"] is not None})
    paths = []
    figure, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
    for axis, size in zip(axes[0], sizes):
        group = [baseline] + [r for r in rows if r["cache_size"] == size]
        axis.bar([r["method"] for r in group], [r["ppl"] for r in group], color="tab:blue")
        axis.set_title(f"cache {size}")
        axis.set_ylabel("PPL")
        axis.tick_params(axis="x", rotation=45)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(f"{title}: methods compared")
    paths.append(_save(figure, folder / "kvcompress_methods.png"))

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["kv_tokens"], r["ppl"]) for r in rows if r["method"] == method)
        axis.plot(*zip(*points), marker="o", label=method)
    axis.set_xlabel("KV size (tokens per layer and head, end of stream)")
    axis.set_ylabel("PPL")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"{title}: PPL vs KV size")
    paths.append(_save(figure, folder / "kvcompress_tradeoff.png"))

    metrics = [("ppl", False), ("next_token_acc", True), ("kv_tokens", False)] + [
        (m, m.startswith("throughput")) for m in ("ttft_seconds", "tpot_seconds", "throughput_tokens_per_second")
        if m in baseline]
    labels = [r["label"] for r in rows]
    matrix = []
    for metric, higher_better in metrics:
        values = [r[metric] for r in rows]
        low, high = min(values), max(values)
        scaled = [(v - low) / (high - low) if high > low else 1.0 for v in values]
        matrix.append([s if higher_better else 1 - s for s in scaled])
    figure, axis = plt.subplots(figsize=(1.2 * len(metrics) + 3, 0.38 * len(rows) + 1.5))
    image = axis.imshow(list(map(list, zip(*matrix))), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(len(metrics)), [m for m, _ in metrics], rotation=30, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    figure.colorbar(image, label="normalised (1 = best)")
    axis.set_title(f"{title}: summary")
    paths.append(_save(figure, folder / "kvcompress_heatmap.png"))

    compressed = sorted((r for r in rows if r["cache_size"] is not None),
                        key=lambda r: r["ppl"] / baseline["ppl"])
    figure, axis = plt.subplots(figsize=(8, 0.32 * len(compressed) + 1.5))
    increase = [100 * (r["ppl"] / baseline["ppl"] - 1) for r in compressed]
    axis.barh([r["label"] for r in compressed], increase, color="tab:orange")
    for i, r in enumerate(compressed):
        saved = 100 * (1 - r["kv_tokens"] / baseline["kv_tokens"])
        axis.annotate(f" KV −{saved:.0f}%", (increase[i], i), va="center", fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("PPL increase vs baseline (%), annotated with the KV saved")
    axis.grid(alpha=0.3, axis="x")
    axis.set_title(f"{title}: cache efficiency")
    paths.append(_save(figure, folder / "kvcompress_cache_efficiency.png"))
    return paths
