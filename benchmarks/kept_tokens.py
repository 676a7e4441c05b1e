"""Which prompt tokens each method keeps on one passkey prompt, and the answer it then gives: the diagnosis behind a
method that scores far below its paper (docs/results.md, "Why h2o fails").

For every method (each at the same budget C) it prints, averaged over layers and KV heads:

- ``key``: the share of the passkey's digit tokens kept (the needle says the key twice; both occurrences count);
- ``question``: the share of the question's tokens kept ("What is the pass key? Answer with the number only.");
- ``first10%``: the share of the kept tokens that lie in the first 10% of the prompt;
- ``answer``: the greedy answer, and whether its first number is the key.

``python -m benchmarks.kept_tokens --model_path qwen2.5-coder-0.5b --length 4096 --depths 0,50,100 \\
    --methods snapkv,h2o,streamingllm --budget 256 [--window_size 8]``

Not a timing: it runs on whatever else the machine is doing.
"""
from __future__ import annotations

import argparse
import sys

import torch

import kvfactory
from kvfactory.benchmarks.needle_haystack import load_haystack_text
from kvfactory.benchmarks.passkey import QUESTION, make_passkey_sample, passkey_found
from kvfactory.generation import greedy_generate


def token_spans(tokenizer, ids: list[int], text: str) -> list[int]:
    """Indices of the tokens overlapping every occurrence of ``text`` in the decoded prompt (tokens decoded one by
    one; exact for the ASCII prompts used here)."""
    pieces = [tokenizer.decode([token]) for token in ids]
    starts, offset = [], 0
    for piece in pieces:
        starts.append(offset)
        offset += len(piece)
    decoded = "".join(pieces)
    found, position = set(), decoded.find(text)
    while position >= 0:
        end = position + len(text)
        found.update(i for i, start in enumerate(starts) if start < end and start + len(pieces[i]) > position)
        position = decoded.find(text, position + 1)
    return sorted(found)


def shares(cache, key_tokens: list[int], question_tokens: list[int], length: int) -> tuple[float, float, float]:
    key_kept = question_kept = early = total = 0.0
    layers = len(cache.stores)
    for layer in range(layers):
        positions = cache.kept_positions(layer)[0]  # (Hkv, T)
        heads = positions.shape[0]
        for head in range(heads):
            kept = set(positions[head][positions[head] >= 0].tolist())
            key_kept += sum(t in kept for t in key_tokens) / max(len(key_tokens), 1)
            question_kept += sum(t in kept for t in question_tokens) / max(len(question_tokens), 1)
            early += sum(p < length // 10 for p in kept)
            total += len(kept)
    units = layers * heads
    return key_kept / units, question_kept / units, early / max(total, 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depths", default="0,50,100", help="key depths in percent, comma-separated")
    parser.add_argument("--methods", default="snapkv,h2o,streamingllm")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--window_size", type=int, default=None, help="observation window of every method")
    parser.add_argument("--haystack_dir", default=None)
    args = parser.parse_args(argv)
    model, tokenizer = kvfactory.models.load(args.model_path, dtype=args.dtype)
    haystack = load_haystack_text(args.haystack_dir)
    stops = [token for token in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
             if isinstance(token, int) and token >= 0]
    extra = {} if args.window_size is None else {"window_size": args.window_size}
    print(f"C={args.budget}, {args.length} tokens{'' if not extra else f', window {args.window_size}'}")
    print(f"{'method':<14}{'depth':>6}{'key':>7}{'question':>10}{'first10%':>10}  answer")
    for depth in (int(d) for d in args.depths.split(",")):
        sample = make_passkey_sample(tokenizer, args.length, depth / 100, haystack=haystack)
        key_tokens = token_spans(tokenizer, sample.input_ids, sample.passkey)
        question_tokens = token_spans(tokenizer, sample.input_ids, QUESTION)
        for method in args.methods.split(","):
            params = {} if method == "fullkv" else {"max_capacity_prompt": args.budget, **extra}
            with kvfactory.patch(model, method, **params) as handle, torch.no_grad():
                (result,) = greedy_generate(model, tokenizer, [sample.input_ids], max_new_tokens=10,
                                            stop_token_ids=stops)
                key, question, early = shares(handle.last_cache, key_tokens, question_tokens, len(sample.input_ids))
            verdict = "found" if passkey_found(result.text, sample.passkey) else "MISSED"
            print(f"{method:<14}{depth:>6}{key:>7.2f}{question:>10.2f}{early:>10.2f}  {result.text.strip()!r} "
                  f"({verdict}, key {sample.passkey})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
