"""The methods of issue 17 against FullKV at one prompt length, all measured in one run on the same machine.

For each method, at its defaults and budget ``C`` (``--budget``, default 256): prefill time ÷ fullkv's (KVzip's
reconstruction passes show here), KV bytes held after prefill ÷ fullkv's, and the mean tokens kept per KV head.
Quest keeps everything (bytes ÷ fullkv ≈ 1); its saving is what a decode step reads, printed as the key/value bytes
read in the last decode step (all layers, min/max metadata included) ÷ what reading the whole cache costs (fullkv).
ThinK is shown alone (key channels only) and over SnapKV.

``OMP_WAIT_POLICY=PASSIVE flock /tmp/kvf_cpu.lock python -m benchmarks.frontier_speed_memory [--length 4096]``
(ratios from one run; on a shared CPU single timings are noisy).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kvfactory
from kvfactory.benchmarks.passkey import make_passkey_sample
from kvfactory.benchmarks.speed import measure

METHODS: list[tuple[str, str, dict]] = [
    ("tova", "tova", {}),
    ("expected_attention", "expected_attention", {}),
    ("kvzip", "kvzip", {}),
    # the general path (padded batches, chunked prefill): the scratch prefill is not reused, the prompt runs 3 times
    ("kvzip, 3 forwards", "kvzip", {"prefill_chunk_size": 1 << 30}),
    ("duo_attention", "duo_attention", {}),
    ("criticalkv", "criticalkv", {}),
    ("keydiff", "keydiff", {}),
    ("think (channels 0.5)", "think", {}),
    ("think + snapkv", "think", {"token_method": "snapkv"}),
    ("quest", "quest", {}),
    ("chunkkv", "chunkkv", {}),
    ("simlayerkv", "simlayerkv", {}),
    ("snapkv (reference)", "snapkv", {}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    parser.add_argument("--budget", type=int, default=256, help="C of every method (default 256)")
    parser.add_argument("--new_tokens", type=int, default=4, help="decode steps after the prefill (default 4)")
    parser.add_argument("--methods", default=None, help="comma-separated labels to run (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = kvfactory.models.load(args.model_path, attn_implementation="sdpa")
    ids = torch.tensor([make_passkey_sample(tokenizer, args.length, 0.5).input_ids])
    with kvfactory.patch(model, "fullkv"):
        # times and bytes only: the untimed memory-counting run would be wasted work here
        full = measure(model, ids, method="fullkv", new_tokens=args.new_tokens, repeats=1, warmup=1,
                       track_memory=False)
    print(f"{args.model_path}, {ids.shape[1]} tokens, C={args.budget}, one run each (fullkv prefill "
          f"{full.prefill_seconds:.2f} s, {full.prefill_cache_bytes / 2**20:.1f} MiB)")
    print(f"    {'method':<22} {'prefill/fullkv':>14} {'bytes/fullkv':>13} {'kept/head':>10}")
    rows = [{"label": "fullkv", **full.as_row()}]
    chosen = None if args.methods is None else set(args.methods.split(","))
    for label, name, params in METHODS:
        if chosen is not None and label not in chosen and name not in chosen:
            continue
        with kvfactory.patch(model, name, max_capacity_prompt=args.budget, **params) as handle:
            result = measure(model, ids, method=name, new_tokens=args.new_tokens, repeats=1, warmup=0,
                             track_memory=False)
            cache = handle.last_cache
        extra = ""
        if name == "quest":
            read = sum(store.last_read_bytes for store in cache.stores)
            whole = sum(store.full_read_bytes for store in cache.stores)
            extra = f"   bytes read per decode step / fullkv {read / whole:.4f}"
            rows.append({"label": "quest read per step", "read_bytes": read, "full_read_bytes": whole})
        print(f"    {label:<22} {result.prefill_seconds / full.prefill_seconds:>14.3f} "
              f"{result.prefill_cache_bytes / full.prefill_cache_bytes:>13.4f} {result.kept_tokens:>10.1f}{extra}")
        rows.append({"label": label, **result.as_row()})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
