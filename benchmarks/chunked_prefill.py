"""Chunked prefill: peak KV-related memory and passkey accuracy, chunked vs unchunked, measured in one run.

For each passkey prompt (``--length`` tokens, depths ``--depths``, ``--seeds`` seeds) the same method runs twice:
unchunked, and with ``prefill_chunk_size=--chunk`` (the prompt fed ``chunk`` tokens at a time, compressed to ``C``
after each chunk). Memory is measured by a tracker that sees the tensors: it wraps the cache's per-layer entry point
and records, at every call, the bytes every layer's store holds plus the queries, keys and values of the tokens in
flight (what the attention and the compression work on). Two peaks are printed:

- **per layer**: the most one layer ever held or received at once (its store plus the new keys/values): the prompt
  length unchunked, ``C + chunk`` chunked;
- **whole cache**: all layers' stores plus the in-flight queries, keys and values (the other layers' compressed
  ``C`` tokens are the same on both sides, so this ratio cannot fall below their share).

Activations outside attention (hidden states, MLP) are not counted. The answer of each prompt is greedy,
``--new_tokens`` tokens, and counts when the passkey appears in it.

``python -m benchmarks.chunked_prefill [--length 8192] [--budget 256] [--chunk 512] [--seeds 1] [--json out.json]``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import kvfactory
from kvfactory.benchmarks.passkey import make_passkey_sample, passkey_found


class PeakTracker:
    """Wraps ``cache.forward_layer`` to record the peak bytes of the stores plus the tensors in flight."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.whole = 0
        self.layer = 0
        original = cache.forward_layer

        def forward_layer(layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          positions: torch.Tensor) -> torch.Tensor:
            in_flight = sum(t.numel() * t.element_size() for t in (queries, keys, values))
            new_kv = sum(t.numel() * t.element_size() for t in (keys, values))
            before = [0 if store is None else store.nbytes() for store in cache.stores]
            output = original(layer_idx, queries, keys, values, positions)
            after = [0 if store is None else store.nbytes() for store in cache.stores]
            self.whole = max(self.whole, sum(before) + in_flight, sum(after) + in_flight)
            self.layer = max(self.layer, before[layer_idx] + new_kv, after[layer_idx])
            return output

        cache.forward_layer = forward_layer


def run(model: Any, tokenizer: Any, samples: list[Any], params: dict[str, Any], new_tokens: int
        ) -> dict[str, Any]:
    found, whole, layer, seconds = 0, 0, 0, 0.0
    with kvfactory.patch(model, "snapkv", **params) as handle, torch.no_grad():
        for sample in samples:
            cache = handle.new_cache()
            tracker = PeakTracker(cache)
            ids = torch.tensor([sample.input_ids])
            started = time.perf_counter()
            output = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                    max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            seconds += time.perf_counter() - started
            answer = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
            found += passkey_found(answer, sample.passkey)
            whole, layer = max(whole, tracker.whole), max(layer, tracker.layer)
    return {"params": params, "found": found, "samples": len(samples), "peak_whole_bytes": whole,
            "peak_layer_bytes": layer, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=8192, help="passkey prompt tokens")
    parser.add_argument("--budget", type=int, default=256, help="C of snapkv")
    parser.add_argument("--chunk", type=int, default=512, help="prefill_chunk_size of the chunked run")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="passkey depths")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = kvfactory.models.load(args.model_path, attn_implementation="sdpa")
    samples = [make_passkey_sample(tokenizer, args.length, float(depth), seed=seed)
               for depth in args.depths.split(",") for seed in range(args.seeds)]
    base = {"max_capacity_prompt": args.budget}
    rows = [run(model, tokenizer, samples, base, args.new_tokens),
            run(model, tokenizer, samples, {**base, "prefill_chunk_size": args.chunk}, args.new_tokens)]
    unchunked, chunked = rows
    print(f"snapkv C={args.budget}, {len(samples[0].input_ids)}-token passkey prompts x {len(samples)}, "
          f"chunk {args.chunk}, {next(model.parameters()).dtype}")
    print(f"    {'config':<12} {'passkey':>8} {'peak layer MiB':>15} {'peak cache+in-flight MiB':>25} {'s':>7}")
    for label, row in (("unchunked", unchunked), (f"chunk {args.chunk}", chunked)):
        print(f"    {label:<12} {row['found']:>4}/{row['samples']:<3} {row['peak_layer_bytes'] / 2**20:>15.2f} "
              f"{row['peak_whole_bytes'] / 2**20:>25.2f} {row['seconds']:>7.0f}")
    print(f"    chunked / unchunked peak: per layer {chunked['peak_layer_bytes'] / unchunked['peak_layer_bytes']:.3f}, "
          f"whole cache + in-flight {chunked['peak_whole_bytes'] / unchunked['peak_whole_bytes']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
