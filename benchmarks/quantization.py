"""Quantized KV cache on SmolLM2 (CPU): bytes, decode time and quality against FullKV, all measured in one run.

1. **Bytes and TPOT** at ``--context`` tokens (default 4096 tokens of PG essays): fullkv, kivi-4, kivi-2, kvquant-4,
   gear-4, each a prefill then ``--new_tokens - 1`` greedy decode steps, round-robin repeats. Cache bytes are
   kvfactory's real count after the last step (packed codes, scales, zero-points, outliers, low-rank factors, the
   residual in the model's dtype, positions). They are divided by the **fp16 FullKV arithmetic** for the same tokens,
   ``2 (K, V) · layers · KV heads · tokens · head_dim · 2 bytes`` (no positions, no headroom: the strictest
   denominator), and also by the FullKV cache measured in this run (the model's dtype, positions and headroom).
2. **Perplexity** on PG-essay windows of ``--ppl_length`` tokens (default 2048): the first half is prefilled with the
   cache quantized, the second half is scored through the cache in chunks of ``quant_residual_length`` tokens
   (which gives exactly what token-by-token decoding gives: every older chunk is quantized when the next arrives).
4. **Head-wise quantization** (``--parts headwise``): adakv keeping ``--headwise_budget`` tokens per KV head on
   average after a ``--context``-token prefill, in full precision and with kivi-4 / kivi-2 (the quantized ragged
   store). Bytes are kvfactory's real count; the denominator is the same adakv cache at 16 bits (measured in a 16-bit
   run; in a float32 run the K/V bytes are converted to 2 bytes per value, everything else as measured).
3. **Quantized pruning** (QPruningKV) at equal memory on the same windows: snapkv keeping ``C`` tokens at 16 bits
   vs snapkv with ``quant_pruning`` at 4 and 2 bits (as many tokens as fit in the same bytes; key groups and residual
   of 32 tokens). Memory is accounted at 16 bits for the baseline (``C`` tokens); in a float32 run the baseline
   really holds twice that, so the quantized side then uses half the memory the baseline measures.

Part 1 also prints the **memory-traffic floor** of each configuration, ``(weights + its cache bytes) ÷ (weights +
fullkv cache bytes)``: the TPOT ratio a step bound only by memory traffic would reach. KIVI decodes through the
fused kernel (:mod:`kvfactory.storage.fused_decode`: attention reads the packed codes); KVQuant and GEAR dequantize.
Part **decode** (``--parts decode``) measures the same TPOT ratios and floors at ``--decode_contexts`` (8192 and
2048) after one shared prefill per context, the caches' decode steps alternated one by one (see
:func:`paired_decode`): the cheap, load-robust version of part 1's TPOT.

``python -m benchmarks.quantization [--dtype float32] [--windows 8] [--parts bytes,ppl,pruning,headwise]
[--configs kivi-4,kivi-2]
[--json results/quantization.json]``
With a 16-bit ``--dtype`` every byte is real (FullKV measured at 16 bits, the residual at 16 bits); with float32 the
residual is fp32 (counted so) while the denominator stays the fp16 arithmetic.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import kvfactory
from kvfactory.benchmarks.ppl import load_documents, split_windows, suffix_ppl, token_stream
from kvfactory.benchmarks.speed import MethodSpec, compare
from kvfactory.quant import get as get_quantizer, kv_shape
from kvfactory.quant.base import POSITION_BYTES
from kvfactory.quant.budget import dense_nbytes
from kvfactory.storage.quantized import QuantizedStore

QUANTIZED = {  # label -> quantization parameters
    "kivi-4": {"quant_method": "kivi", "nbits": 4},
    "kivi-2": {"quant_method": "kivi", "nbits": 2},
    "kvquant-4": {"quant_method": "kvquant", "nbits": 4},
    "gear-4": {"quant_method": "gear", "nbits": 4},
}


def fp16_fullkv_bytes(config: Any, tokens: int) -> int:
    """K and V of every layer at 2 bytes per value: what an fp16 FullKV cache of ``tokens`` tokens holds."""
    heads, head_dim = kv_shape(config)
    return 2 * config.num_hidden_layers * heads * tokens * head_dim * 2


def full_residual_bytes(config: Any, params: dict[str, Any], tokens: int, dtype_bytes: int) -> int:
    """Arithmetic bytes of the same cache when its residual is at its fullest (``R`` tokens awaiting quantization):
    the other end of the range a decode run moves through."""
    params = dict(params)
    quantizer = get_quantizer(params.pop("quant_method"), **params)
    heads, head_dim = kv_shape(config)
    quantized = max(0, tokens - quantizer.quant_residual_length) // quantizer.q_group_size * quantizer.q_group_size
    residual = (tokens - quantized) * heads * 2 * head_dim * dtype_bytes
    per_layer = quantizer.block_nbytes(1, heads, quantized, head_dim) + residual + tokens * heads * POSITION_BYTES
    return config.num_hidden_layers * per_layer


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters (a tied embedding counted once: a decode step reads it once, as the head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bytes_and_tpot(model: Any, stream: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    ids = torch.tensor([stream[: args.context]])
    labels = [label for label in args.configs.split(",") if label]
    unknown = sorted(set(labels) - set(QUANTIZED))
    if unknown:
        raise ValueError(f"--configs: unknown {', '.join(unknown)}; accepted: {', '.join(QUANTIZED)}")
    specs = [MethodSpec("fullkv", {}, "fullkv")] + [MethodSpec("fullkv", QUANTIZED[label], label) for label in labels]
    results = compare(model, ids, specs, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup)
    dtype_bytes = next(model.parameters()).element_size()
    tokens = ids.shape[1] + args.new_tokens - 1
    reference = fp16_fullkv_bytes(model.config, tokens)
    full = results[0]
    weights = weight_bytes(model)
    rows = []
    print(f"[1] {ids.shape[1]}-token prompt + {args.new_tokens - 1} decode steps ({tokens} tokens cached), "
          f"{args.dtype}, {args.repeats} round-robin repeats; fp16 FullKV arithmetic = {reference / 2**20:.2f} MiB")
    print(f"    {'config':<10} {'MiB':>8} {'÷ fp16 FullKV':>14} {'÷ measured fullkv':>18} {'TPOT ms':>8} "
          f"{'TPOT ÷ fullkv':>14} {'traffic floor':>14} {'prefill ÷ fullkv':>17} {'residual full ÷ fp16':>21}")
    print(f"    (traffic floor: the TPOT ratio a purely memory-bound step would reach, (weights + this cache) ÷ "
          f"(weights + fullkv cache), weights {weights / 2**20:.1f} MiB)")
    for result in results:
        row = {
            "config": result.label, "cache_bytes": result.cache_bytes, "tokens": tokens,
            "bytes_over_fp16_fullkv": result.cache_bytes / reference,
            "bytes_over_measured_fullkv": result.cache_bytes / full.cache_bytes,
            "tpot_ms": result.tpot_seconds * 1000, "tpot_over_fullkv": result.tpot_seconds / full.tpot_seconds,
            "traffic_floor": (weights + result.cache_bytes) / (weights + full.cache_bytes), "weight_bytes": weights,
            "prefill_over_fullkv": result.prefill_seconds / full.prefill_seconds,
            "full_residual_over_fp16_fullkv": float("nan") if result.label == "fullkv" else
            full_residual_bytes(model.config, QUANTIZED[result.label], tokens, dtype_bytes) / reference,
        }
        rows.append(row)
        print(f"    {row['config']:<10} {row['cache_bytes'] / 2**20:>8.2f} {row['bytes_over_fp16_fullkv']:>14.4f} "
              f"{row['bytes_over_measured_fullkv']:>18.4f} {row['tpot_ms']:>8.1f} {row['tpot_over_fullkv']:>14.3f} "
              f"{row['traffic_floor']:>14.3f} "
              f"{row['prefill_over_fullkv']:>17.3f} {row['full_residual_over_fp16_fullkv']:>21.4f}")
    return rows


def paired_decode(model: Any, stream: list[int], args: argparse.Namespace, context: int) -> list[dict[str, Any]]:
    """TPOT of fullkv and the quantized configurations after **one** shared ``context``-token prefill: the fullkv
    cache's rows are quantized into each configuration's stores exactly as its own prefill would (every whole key
    group quantized, an empty residual), then the decode steps of all caches are alternated one by one (every order
    of the caches in turn) so that background load hits them alike; medians of ``--decode_steps`` steps. Cheap on a
    loaded machine (one prefill instead of one per configuration and repeat)."""
    labels = [label for label in args.configs.split(",") if label]
    ids = torch.tensor([stream[:context]])
    weights = weight_bytes(model)
    with kvfactory.patch(model, "fullkv") as handle, torch.no_grad():
        cache = handle.new_cache()
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        caches, stores = {"fullkv": cache}, cache.stores
        for label in labels:
            params = dict(QUANTIZED[label])
            quantizer = get_quantizer(params.pop("quant_method"), **params)
            cache.stores = [None] * len(stores)
            clone = copy.deepcopy(cache)
            clone.stores = [QuantizedStore.from_rows([store.row(0)], quantizer) for store in stores]
            caches[label] = clone
        cache.stores = stores
        names, times = list(caches), {name: [] for name in caches}
        tokens = {name: token for name in caches}
        # every order in turn: each cache runs after each other cache equally often (a rotation let the second
        # configuration follow fullkv two steps in three: it measured 8-15% slower than the third, in either order)
        orders = list(itertools.permutations(names))
        for step in range(args.decode_steps + 1):
            for name in orders[step % len(orders)]:
                started = time.perf_counter()
                logits = model(tokens[name], past_key_values=caches[name], use_cache=True).logits
                if step:  # the first step of each cache is a warm-up
                    times[name].append(time.perf_counter() - started)
                tokens[name] = logits[:, -1:].argmax(-1)
    tpot = {name: statistics.median(step_times) for name, step_times in times.items()}
    full_bytes = caches["fullkv"].nbytes()
    print(f"[1b] {context}-token prompt, one shared prefill, then {args.decode_steps} decode steps of every cache "
          f"alternated one by one, every order in turn ({args.dtype}; weights {weights / 2**20:.1f} MiB)")
    print(f"    {'config':<10} {'cache MiB':>10} {'TPOT ms':>8} {'TPOT ÷ fullkv':>14} {'traffic floor':>14}")
    rows = []
    for name in names:
        nbytes = caches[name].nbytes()
        row = {"config": name, "context": context, "cache_bytes": nbytes, "tpot_ms": tpot[name] * 1000,
               "tpot_over_fullkv": tpot[name] / tpot["fullkv"],
               "traffic_floor": (weights + nbytes) / (weights + full_bytes), "weight_bytes": weights}
        rows.append(row)
        print(f"    {name:<10} {nbytes / 2**20:>10.2f} {row['tpot_ms']:>8.1f} {row['tpot_over_fullkv']:>14.3f} "
              f"{row['traffic_floor']:>14.3f}")
    return rows


def headwise_bytes(model: Any, stream: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """adakv's ragged cache in full precision and quantized, right after the prefill (no decoded tail yet)."""
    ids = torch.tensor([stream[: args.context]])
    heads, head_dim = kv_shape(model.config)
    dtype_bytes = next(model.parameters()).element_size()
    budget = args.headwise_budget
    configs = {"adakv": {}, "adakv+kivi-4": {"quant_method": "kivi", "nbits": 4},
               "adakv+kivi-2": {"quant_method": "kivi", "nbits": 2}}
    print(f"[4] head-wise adakv C={budget} after a {ids.shape[1]}-token prefill, {args.dtype}: ragged storage, "
          "quantized prefix for kivi")
    print(f"    {'config':<14} {'MiB':>8} {'kept/layer':>11} {'÷ adakv 16-bit':>15}")
    rows, reference = [], None
    for label, params in configs.items():
        with kvfactory.patch(model, "adakv", max_capacity_prompt=budget, **params) as handle, torch.no_grad():
            model(ids, use_cache=True)
            cache = handle.last_cache
            nbytes, kept = cache.nbytes(), sum(cache.mean_kept_tokens()) * heads
        if reference is None:  # the same cache at 16 bits: K and V at 2 bytes per value, the rest as held
            reference = nbytes - round(kept) * 2 * head_dim * (dtype_bytes - 2)
        row = {"config": label, "cache_bytes": nbytes, "kept_tokens_per_layer": kept / len(cache.stores),
               "bytes_over_adakv_16bit": nbytes / reference, "adakv_16bit_bytes": reference}
        rows.append(row)
        print(f"    {label:<14} {nbytes / 2**20:>8.2f} {row['kept_tokens_per_layer']:>11.1f} "
              f"{row['bytes_over_adakv_16bit']:>15.4f}")
    return rows


def perplexity(model: Any, windows: list[list[int]], configs: dict[str, tuple[str, dict[str, Any]]], title: str,
               reference: str, chunk: int) -> list[dict[str, Any]]:
    rows = []
    print(title)
    print(f"    {'config':<22} {'PPL':>8} {'÷ ' + reference:>12} {'kept/layer':>11} {'prefix MiB':>11} {'s':>6}")
    base = None
    for label, (method, params) in configs.items():
        result = suffix_ppl(model, windows, method=method, params=params, prefix_ratio=0.5, suffix_chunk=chunk,
                            label=label, progress=False)
        base = result.ppl if label == reference else base
        row = {"config": label, "method": method, "params": params, "ppl": result.ppl,
               "next_token_acc": result.accuracy, "kept_tokens": result.kept_tokens,
               "prefix_cache_bytes": result.cache_bytes, "seconds": result.seconds, "scored_tokens": result.tokens}
        row["ppl_over_reference"] = result.ppl / base if base else float("nan")
        rows.append(row)
        print(f"    {label:<22} {result.ppl:>8.3f} {row['ppl_over_reference']:>12.4f} {result.kept_tokens:>11.1f} "
              f"{result.cache_bytes / 2**20:>11.2f} {result.seconds:>6.0f}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens for bytes and TPOT")
    parser.add_argument("--new_tokens", type=int, default=16, help="generated tokens per timing run")
    parser.add_argument("--configs", default=",".join(QUANTIZED),
                        help=f"quantized configurations timed against fullkv in part 1 (of {', '.join(QUANTIZED)})")
    parser.add_argument("--decode_contexts", default="8192,2048", help="prompt lengths of the paired decode part")
    parser.add_argument("--decode_steps", type=int, default=16, help="timed decode steps per cache (paired part)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ppl_length", type=int, default=2048, help="tokens per perplexity window")
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows")
    parser.add_argument("--budget", type=int, default=128, help="C of the quantized-pruning comparison")
    parser.add_argument("--headwise_budget", type=int, default=512, help="C of adakv in the head-wise bytes part")
    parser.add_argument("--parts", default="bytes,ppl,pruning,headwise",
                        help="comma-separated parts to run: bytes, decode, ppl, pruning, headwise")
    parser.add_argument("--data_dir", default=None, help="folder of PG essays (default: the shared data folder)")
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = kvfactory.models.load(args.model_path, dtype=args.dtype, attn_implementation="sdpa")
    stream = token_stream(tokenizer, load_documents("pg_essays", args.data_dir))
    chunk = get_quantizer("kivi").quant_residual_length
    parts = set(args.parts.split(","))
    unknown = parts - {"bytes", "decode", "ppl", "pruning", "headwise"}
    if unknown:
        raise ValueError(f"--parts: unknown {', '.join(sorted(unknown))}; accepted: bytes, decode, ppl, pruning, "
                         "headwise")
    rows: dict[str, Any] = {}
    if "bytes" in parts:
        rows["bytes_tpot"] = bytes_and_tpot(model, stream, args)
    if "decode" in parts:
        rows["paired_decode"] = [row for context in map(int, args.decode_contexts.split(","))
                                 for row in paired_decode(model, stream, args, context)]

    windows = split_windows(stream[args.context :], args.ppl_length, args.windows)  # text unseen in part 1
    quality = {"fullkv": ("fullkv", {})} | {label: ("fullkv", p) for label, p in QUANTIZED.items()}
    if "ppl" in parts:
        rows["ppl"] = perplexity(model, windows, quality, f"[2] PG-essay suffix PPL, {len(windows)} windows of "
                                 f"{args.ppl_length} tokens (prefix {args.ppl_length // 2} quantized, suffix in "
                                 f"chunks of {chunk})", "fullkv", chunk)

    budget = {"max_capacity_prompt": args.budget}
    # small groups and residual: at C=128 the default 128-token residual alone would fill the budget
    pruned = {"quant_method": "kivi", "quant_pruning": True, "q_group_size": 32, "quant_residual_length": 32}
    pruning = {
        f"snapkv C={args.budget} 16-bit": ("snapkv", budget),
        "snapkv+kivi-4 pruning": ("snapkv", {**budget, **pruned, "nbits": 4}),
        "snapkv+kivi-2 pruning": ("snapkv", {**budget, **pruned, "nbits": 2}),
    }
    heads, head_dim = kv_shape(model.config)
    memory = model.config.num_hidden_layers * dense_nbytes(args.budget, heads, head_dim)
    title = (f"[3] quantized pruning at the memory of C={args.budget} 16-bit tokens (same windows): "
             f"{memory / 2**20:.3f} MiB (K, V, positions; 'prefix MiB' is what each cache really holds)")
    if "pruning" in parts:
        rows["pruning"] = perplexity(model, windows, pruning, title, f"snapkv C={args.budget} 16-bit", chunk)
    if "headwise" in parts:
        rows["headwise"] = headwise_bytes(model, stream, args)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
