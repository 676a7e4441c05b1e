"""Core overheads and savings, all measured in one run against FullKV on the same machine.

1. patched ``fullkv`` ÷ unpatched model: prefill time and TPOT (the patch's own cost; goal within 3%);
2. snapkv / pyramidkv / h2o prefill ÷ fullkv at 4k tokens (the scoring cost; goal ≤ 5%), on sdpa, and h2o again on
   eager attention, where its column sums are read off the weights the layer computes anyway (on CPU sdpa exact H2O
   gets them from the fused C++ kernel of ``kvfactory.kernels``, in the same pass as the attention output; without
   a compiler, or with ``KVFACTORY_NO_CPP_KERNELS=1``, it needs one more attention-sized pass);
3. TPOT snapkv(C=256) ÷ fullkv at 8k tokens (goal ≤ 0.5);
4. KV bytes ÷ fullkv (goal = C / n).

``python -m benchmarks.core_speed_memory [--model_path smollm2-135m] [--short] [--parts prefill]`` (``--short`` for
a quick look; ``--parts`` runs some of: overhead [1], prefill [2] on sdpa, eager [2] on eager attention, decode [3]
and [4]).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kvfactory
from kvfactory.benchmarks.passkey import make_passkey_sample
from kvfactory.benchmarks.speed import SpeedResult, measure


def prompt(tokenizer, length: int) -> torch.Tensor:
    return torch.tensor([make_passkey_sample(tokenizer, length, 0.5).input_ids])


def run(model, ids: torch.Tensor, method: str, new_tokens: int, repeats: int, warmup: int, **params) -> SpeedResult:
    # times and cache bytes only: the untimed memory-counting run would be wasted work here
    if method == "unpatched":
        return measure(model, ids, method=method, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                       track_memory=False)
    with kvfactory.patch(model, method, **params):
        return measure(model, ids, method=method, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                       track_memory=False)


PARTS = ("overhead", "prefill", "eager", "decode")


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def overhead(model, tokenizer, length: int, repeats: int) -> list[SpeedResult]:
    """[1] patched fullkv ÷ unpatched, prefill and TPOT, interleaved in ABBA order (unpatched first in even rounds,
    patched first in odd ones) so that drift and the position in a round hit both sides alike."""
    ids = prompt(tokenizer, length)
    run(model, ids, "unpatched", 2, 1, 0)  # warm-up
    baseline: list[SpeedResult] = []
    patched: list[SpeedResult] = []
    for round_index in range(repeats):
        sides = [("unpatched", baseline), ("fullkv", patched)]
        for name, results in sides if round_index % 2 == 0 else reversed(sides):
            results.append(run(model, ids, name, 32, 1, 0))
    print(f"[1] {length} tokens, {repeats} interleaved runs")
    prefill_ratio = median([p.prefill_seconds for p in patched]) / median([b.prefill_seconds for b in baseline])
    tpot_ratio = median([p.tpot_seconds for p in patched]) / median([b.tpot_seconds for b in baseline])
    print(f"    patched fullkv / unpatched: prefill {prefill_ratio:.3f}, TPOT {tpot_ratio:.3f}")
    return baseline + patched


def prefill(model, tokenizer, length: int, repeats: int, budget: int) -> list[SpeedResult]:
    """[2] snapkv / pyramidkv / h2o prefill ÷ fullkv, interleaved so that drift and load from other processes hit
    every method alike."""
    ids = prompt(tokenizer, length)
    scored = ("snapkv", "pyramidkv", "h2o")
    runs: dict[str, list[SpeedResult]] = {name: [] for name in ("fullkv", *scored)}
    for repeat in range(repeats):
        for name in runs:
            params = {} if name == "fullkv" else {"max_capacity_prompt": budget}
            runs[name].append(run(model, ids, name, 4, 1, int(repeat == 0 and name == "fullkv"), **params))
    full_prefill = median([r.prefill_seconds for r in runs["fullkv"]])
    full = runs["fullkv"][-1]
    print(f"[2] prefill at {ids.shape[1]} tokens, {repeats} interleaved runs, fullkv median {full_prefill:.2f} s")
    for method in scored:
        result = runs[method][-1]
        ratio = median([r.prefill_seconds for r in runs[method]]) / full_prefill
        print(f"    {method:<10} prefill / fullkv {ratio:.3f}"
              f"   bytes / fullkv {result.prefill_cache_bytes / full.prefill_cache_bytes:.4f}"
              f"   kept {result.kept_tokens:.0f}/{ids.shape[1]} (C/n = {budget / ids.shape[1]:.4f})")
    return [result for results in runs.values() for result in results]


def eager_prefill(model_path: str, tokenizer, length: int, repeats: int, budget: int) -> None:
    """[2] h2o prefill ÷ fullkv on eager attention, where the column sums come with the weights."""
    ids = prompt(tokenizer, length)
    eager_model, _ = kvfactory.models.load(model_path, attn_implementation="eager")
    eager: dict[str, list[SpeedResult]] = {"fullkv": [], "h2o": []}
    for repeat in range(repeats):
        for name in eager:
            params = {} if name == "fullkv" else {"max_capacity_prompt": budget}
            eager[name].append(run(eager_model, ids, name, 4, 1, int(repeat == 0 and name == "fullkv"), **params))
    eager_full = median([r.prefill_seconds for r in eager["fullkv"]])
    eager_ratio = median([r.prefill_seconds for r in eager["h2o"]]) / eager_full
    print(f"    eager attention: h2o prefill / fullkv {eager_ratio:.3f} (fullkv eager median {eager_full:.2f} s)")


def decode(model, tokenizer, length: int, budget: int) -> list[SpeedResult]:
    """[3] TPOT snapkv ÷ fullkv and [4] KV bytes snapkv ÷ fullkv."""
    ids = prompt(tokenizer, length)
    full = run(model, ids, "fullkv", 16, 1, 0)
    snap = run(model, ids, "snapkv", 16, 1, 0, max_capacity_prompt=budget)
    print(f"[3] decode at {ids.shape[1]} tokens: TPOT fullkv {full.tpot_seconds * 1000:.1f} ms, snapkv(C={budget}) "
          f"{snap.tpot_seconds * 1000:.1f} ms, ratio {snap.tpot_seconds / full.tpot_seconds:.3f}")
    # A decode step reads every weight (the tied embedding once, as the output projection) and the whole cache: where
    # both reads run at memory bandwidth the ratio cannot fall below this, whatever the implementation.
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = (weights + snap.prefill_cache_bytes) / (weights + full.prefill_cache_bytes)
    print(f"    memory-traffic floor of that ratio: weights {weights / 2**20:.0f} MiB + cache (fullkv "
          f"{full.prefill_cache_bytes / 2**20:.0f} MiB, snapkv {snap.prefill_cache_bytes / 2**20:.1f} MiB) per step "
          f"-> {floor:.3f}")
    print(f"[4] KV bytes snapkv / fullkv after prefill at {ids.shape[1]}: "
          f"{snap.prefill_cache_bytes / full.prefill_cache_bytes:.4f} (C/n = {budget / ids.shape[1]:.4f}); "
          f"after 15 decode steps (append headroom included): {snap.cache_bytes / full.cache_bytes:.4f}")
    return [full, snap]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", default="smollm2-135m")
    parser.add_argument("--budget", type=int, default=256, help="C for the compressed methods")
    parser.add_argument("--short", action="store_true", help="1k/2k/2k instead of 2k/4k/8k, one repeat")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved runs per method in [1] and [2], whose medians are compared (default 3)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)} (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts or parts - set(PARTS):
        parser.error(f"--parts takes some of {','.join(PARTS)}, got {args.parts!r}")
    torch.manual_seed(0)
    model, tokenizer = kvfactory.models.load(args.model_path, attn_implementation="sdpa")
    overhead_length, prefill_length, decode_length = (1024, 2048, 2048) if args.short else (2048, 4096, 8192)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    repeats = 1 if args.short else args.repeats
    rows: list[SpeedResult] = []
    if "overhead" in parts:
        rows += overhead(model, tokenizer, overhead_length, repeats)
    if "prefill" in parts:
        rows += prefill(model, tokenizer, prefill_length, repeats, args.budget)
    if "eager" in parts:
        eager_prefill(args.model_path, tokenizer, prefill_length, repeats, args.budget)
    if "decode" in parts:
        rows += decode(model, tokenizer, decode_length, args.budget)
    if args.json:
        args.json.write_text(json.dumps([r.as_row() for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
