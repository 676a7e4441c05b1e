"""Head-wise budgets and batching on the embedded model, measured in one run against SnapKV / batch 1.

1. cache bytes of adakv (ragged storage) vs snapkv at the same C (goal: equal within Hkv tokens per layer);
2. decode TPOT adakv / snapkv (goal: within 15%);
3. throughput of a batch of 8 left-padded prompts / one prompt at a time (goal: >= 2.5), decode-only and end to end;
5. (``--parts shapes``) adakv ÷ snapkv decode step at C=1024 after an 8k prompt on a random-weight model of
   Llama-3-8B's attention shape (8 KV heads of 128 channels, 4 layers) and on SmolLM2 (goal: <= 1.05; adakv's ragged
   store attends through :func:`kvfactory.kernels.ragged_decode_attention`, each KV head reading its own slots);
4. passkey accuracy at C=128 over depths and seeds: fullkv, snapkv, adakv, headkv (head scores computed for this
   model by kvfactory.retrieval_heads when missing), at each pooling kernel of ``--kernel_sizes`` (7 is KVCF's
   default; SmolLM2 spells numbers one digit per token, and 11 reaches all five digits of a key: docs/methods.md).

``python -m benchmarks.headwise_batching [--model_path smollm2-135m] [--length 1000] [--seeds 3] [--kernel_sizes 7,11]
[--parts timing,accuracy,shapes]``
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import kvfactory
from kvfactory.benchmarks.passkey import make_passkey_sample, passkey_found
from kvfactory.benchmarks.speed import measure
from kvfactory.generation import greedy_generate, left_pad
from kvfactory.paths import REPO_ROOT
from kvfactory.retrieval_heads import retrieval_head_scores

DEPTHS = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=1000, help="passkey prompt length")
    parser.add_argument("--seeds", type=int, default=3, help="passkey seeds (x 7 depths)")
    parser.add_argument("--head_path", type=Path, default=REPO_ROOT / "data" / "heads_score" / "smollm2-135m.json")
    parser.add_argument("--kernel_sizes", default="7,11", help="pooling kernels the accuracy part runs, a,b,...")
    parser.add_argument("--parts", default="timing,accuracy",
                        help="timing (items 1-3: needs a quiet machine), accuracy (item 4: does not), shapes (item 5)")
    parser.add_argument("--shapes_context", type=int, default=8192, help="prompt tokens of item 5")
    parser.add_argument("--shapes_budget", type=int, default=1024, help="C of item 5")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts or parts - {"timing", "accuracy", "shapes"}:
        parser.error(f"--parts takes timing, accuracy and/or shapes, got {args.parts!r}")
    if "shapes" in parts:
        shapes(args.model_path, args.shapes_context, args.shapes_budget)
        if parts == {"shapes"}:
            return 0
    model, tokenizer = kvfactory.models.load(args.model_path)
    budget = 128
    if "timing" in parts:
        timing(model, tokenizer, budget, args.length, args.model_path)
    if "accuracy" in parts:
        accuracy(model, tokenizer, budget, args)
    return 0


def paired_tpot(model_path: str | Callable[[], Any], ids: torch.Tensor, budget: int,
                names: tuple[str, ...] = ("snapkv", "adakv"), steps: int = 48) -> dict[str, float]:
    """Median decode step of each method, their steps alternated one by one (one model instance and cache per
    method, the order swapped every step), so that background load hits every method alike. ``model_path``: a
    model name, or a function building the model."""
    def load() -> Any:
        return model_path() if callable(model_path) else kvfactory.models.load(model_path)[0]

    models = {name: load() for name in names}
    handles = {name: kvfactory.patch(models[name], name, max_capacity_prompt=budget) for name in names}
    state, times = {}, {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            output = models[name](ids, past_key_values=handles[name].new_cache(), use_cache=True)
            state[name] = (output.logits[:, -1:].argmax(-1), output.past_key_values)
        for step in range(steps):
            for name in names if step % 2 == 0 else names[::-1]:
                token, cache = state[name]
                started = time.perf_counter()
                output = models[name](token, past_key_values=cache, use_cache=True)
                state[name] = (output.logits[:, -1:].argmax(-1), output.past_key_values)
                times[name].append(time.perf_counter() - started)
    for handle in handles.values():
        handle.remove()
    return {name: statistics.median(step_times) for name, step_times in times.items()}


def timing(model, tokenizer, budget: int, length: int, model_path: str) -> None:
    """Items 1-3: adakv vs snapkv bytes and TPOT, batch-8 vs one-at-a-time throughput."""
    ids = torch.tensor([make_passkey_sample(tokenizer, 2048, 0.5).input_ids])
    print(f"[1,2] {ids.shape[1]}-token prompt, C={budget}, 32 new tokens, 3 interleaved runs")
    runs: dict[str, list] = {"snapkv": [], "adakv": []}
    for _ in range(3):
        for name in runs:
            with kvfactory.patch(model, name, max_capacity_prompt=budget):
                runs[name].append(measure(model, ids, method=name, new_tokens=32, repeats=1, warmup=1,
                                          track_memory=False))
    snap, ada = runs["snapkv"][-1], runs["adakv"][-1]
    heads = model.config.num_key_value_heads
    token_bytes = snap.prefill_cache_bytes / (snap.kept_tokens * heads * model.config.num_hidden_layers)
    print(f"    bytes adakv / snapkv {ada.prefill_cache_bytes / snap.prefill_cache_bytes:.4f}  "
          f"(difference {(ada.prefill_cache_bytes - snap.prefill_cache_bytes) / token_bytes / model.config.num_hidden_layers:+.2f} "
          f"tokens per layer; mean kept per head {ada.kept_tokens:.2f} vs {snap.kept_tokens:.2f})")
    tpot = {name: statistics.median(r.tpot_seconds for r in results) for name, results in runs.items()}
    print(f"    TPOT snapkv {tpot['snapkv'] * 1000:.1f} ms, adakv {tpot['adakv'] * 1000:.1f} ms, "
          f"ratio {tpot['adakv'] / tpot['snapkv']:.3f}")

    paired = paired_tpot(model_path, ids, budget)
    print(f"    paired decode steps (two model instances, 48 steps alternated one by one): TPOT snapkv "
          f"{paired['snapkv'] * 1000:.1f} ms, adakv {paired['adakv'] * 1000:.1f} ms, "
          f"ratio {paired['adakv'] / paired['snapkv']:.3f}")

    prompts = [make_passkey_sample(tokenizer, length - 40 * i, DEPTHS[i % 7], seed=i).input_ids for i in range(8)]
    batch, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=budget):
        # times only: the untimed memory-counting run would be wasted work here
        together = measure(model, batch, method="snapkv", new_tokens=32, repeats=1, warmup=1, attention_mask=mask,
                           track_memory=False)
        alone = [measure(model, torch.tensor([p]), method="snapkv", new_tokens=32, repeats=1, warmup=0,
                         track_memory=False) for p in prompts]
    decode_one = sum(r.decode_seconds for r in alone)
    total_one = sum(r.prefill_seconds + r.decode_seconds for r in alone)
    print(f"[3] 8 prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, snapkv C={budget}, 32 new tokens:"
          f" decode throughput batch 8 / batch 1 = {decode_one / together.decode_seconds:.2f}; end to end (prefill "
          f"included) = {total_one / (together.prefill_seconds + together.decode_seconds):.2f}")


# Llama-3-8B's attention scaled down to fit the CPU: its 8 KV heads of 128 channels, 16 query heads (not 32: the
# hidden size is heads x head_dim in transformers 4.44), 4 layers, a small MLP and vocabulary (the attention is a
# larger share of the step than in the real model, which makes the ratio stricter).
LLAMA3_SHAPE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, intermediate_size=1024,
                    num_hidden_layers=4, vocab_size=1024, max_position_embeddings=32768, rope_theta=500000.0)


SHAPES_STEPS = 24  # paired decode steps per model in item 5 (each model pays an 8k prefill per method first)


def shapes(model_path: str, context: int, budget: int) -> None:
    """Item 5: paired decode steps of adakv (ragged) and snapkv at ``budget`` after a ``context``-token prompt, on a
    random-weight model of Llama-3-8B's attention shape and on ``model_path``."""
    from transformers import LlamaConfig

    def random_llama3() -> Any:
        return kvfactory.models.random_model(LlamaConfig(**LLAMA3_SHAPE), seed=0)

    generator = torch.Generator().manual_seed(0)
    cases = [("random Llama-3-8B attention shape (8 KV heads x 128, 4 layers)", random_llama3, 1024),
             (model_path, model_path, None)]
    print(f"[5] adakv ÷ snapkv decode step at C={budget} after a {context}-token prompt ({SHAPES_STEPS} paired steps)")
    for label, load, vocab in cases:
        if vocab is None:
            vocab = kvfactory.models.load(model_path)[0].config.vocab_size
        ids = torch.randint(3, vocab, (1, context), generator=generator)
        paired = paired_tpot(load, ids, budget, steps=SHAPES_STEPS)
        print(f"    {label}: TPOT snapkv {paired['snapkv'] * 1000:.1f} ms, adakv {paired['adakv'] * 1000:.1f} ms, "
              f"ratio {paired['adakv'] / paired['snapkv']:.3f}")


def accuracy(model, tokenizer, budget: int, args: argparse.Namespace) -> None:
    """Item 4: passkey accuracy of fullkv, snapkv, adakv and headkv over depths and seeds."""
    if not args.head_path.exists():
        print(f"    computing retrieval-head scores for HeadKV into {args.head_path}")
        args.head_path.parent.mkdir(parents=True, exist_ok=True)
        args.head_path.write_text(json.dumps(retrieval_head_scores(model, tokenizer, num_samples=10, length=1000)))
    configs: list[tuple[str, str, dict]] = [("fullkv", "fullkv", {})]  # (label, method, parameters)
    for kernel in (int(k) for k in args.kernel_sizes.split(",")):
        pooled = {"max_capacity_prompt": budget, "kernel_size": kernel}
        configs += [(f"snapkv k={kernel}", "snapkv", pooled), (f"adakv k={kernel}", "adakv", pooled),
                    (f"headkv k={kernel}", "headkv", {"head_path": str(args.head_path), **pooled})]
    samples = [make_passkey_sample(tokenizer, args.length, depth, seed=seed) for seed in range(args.seeds)
               for depth in DEPTHS]
    found: dict[str, list[bool]] = {label: [] for label, _, _ in configs}
    for label, method, params in configs:
        with kvfactory.patch(model, method, **params):
            for sample in samples:
                (result,) = greedy_generate(model, tokenizer, [sample.input_ids], max_new_tokens=8,
                                            stop_token_ids=[tokenizer.eos_token_id])
                found[label].append(passkey_found(result.text, sample.passkey))
    print(f"[4] passkey accuracy, {len(samples)} prompts of ~{args.length} tokens ({args.seeds} seeds x 7 depths), "
          f"C={budget}: " + ", ".join(f"{name} {sum(hits)}/{len(samples)}" for name, hits in found.items()))
    for name in found:
        missed = [f"depth {sample.depth:.2f} seed {i // len(DEPTHS)}" for i, (sample, full, hit)
                  in enumerate(zip(samples, found["fullkv"], found[name])) if full and not hit]
        print(f"    {name}: wrong where fullkv is right on {len(missed)} prompt(s){': ' if missed else ''}"
              f"{', '.join(missed)}")


if __name__ == "__main__":
    sys.exit(main())
