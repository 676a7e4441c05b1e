"""Head-importance scores for HeadKV, computed for any model: retrieval heads found with needle prompts.

Retrieval-head detection (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality",
arXiv:2404.15574), the signal HeadKV's published files are built from: a passkey needle is hidden in filler text and
the model is asked to repeat it; at every decoding step whose token is copied from the needle, a query head scores a
hit when its strongest attention lands on a needle position holding that very token. A head's score for a sample is
``hits / needle tokens``. The output is HeadKV's format, ``{"layer-head": [score per sample, ...]}``, loadable with
``kvfactory.methods.get("headkv", head_path=...)``.

``python -m kvfactory.retrieval_heads --model_path smollm2-135m --out data/heads_score/smollm2-135m.json``
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvfactory.benchmarks.passkey import NEEDLE, make_passkey_sample

logger = logging.getLogger(__name__)


def needle_span(input_ids: list[int], needle_ids: list[int]) -> range:
    """Token positions of the needle inside the prompt (its last occurrence)."""
    for start in range(len(input_ids) - len(needle_ids), -1, -1):
        if input_ids[start : start + len(needle_ids)] == needle_ids:
            return range(start, start + len(needle_ids))
    raise ValueError("the needle's tokens do not appear verbatim in the prompt")


@torch.no_grad()
def score_sample(model: Any, input_ids: list[int], span: range, max_new_tokens: int) -> torch.Tensor:
    """Hits per (layer, query head) for one prompt, divided by the needle length: ``(L, Hq)``."""
    device = next(model.parameters()).device
    needle_tokens = torch.tensor([input_ids[i] for i in span], device=device)
    output = model(torch.tensor([input_ids], device=device), use_cache=True)
    hits = None
    token = output.logits[:, -1:].argmax(-1)
    for _ in range(max_new_tokens):
        output = model(token, past_key_values=output.past_key_values, use_cache=True, output_attentions=True)
        attention = torch.stack([layer[0, :, -1, : len(input_ids)] for layer in output.attentions])  # (L, Hq, n)
        hits = torch.zeros(attention.shape[:2], device=device) if hits is None else hits
        if bool((needle_tokens == token[0, 0]).any()):
            top = attention.argmax(-1)  # (L, Hq)
            in_needle = (top >= span.start) & (top < span.stop)
            copied = torch.tensor(input_ids, device=device)[top] == token[0, 0]
            hits += (in_needle & copied).float()
        token = output.logits[:, -1:].argmax(-1)
    return (hits if hits is not None else torch.zeros(1, 1)).cpu() / len(span)


def retrieval_head_scores(model: Any, tokenizer: Any, *, num_samples: int = 10, length: int = 1000,
                          max_new_tokens: int = 24, seed: int = 0) -> dict[str, list[float]]:
    """Scores of every (layer, query head) over ``num_samples`` needle prompts at evenly spread depths."""
    per_sample = []
    for index in tqdm(range(num_samples), desc="retrieval heads", disable=num_samples < 2):
        depth = (index + 0.5) / num_samples
        sample = make_passkey_sample(tokenizer, length, depth, seed=seed + index)
        needle_ids = tokenizer(NEEDLE.format(key=sample.passkey).strip(), add_special_tokens=False).input_ids
        span = needle_span(sample.input_ids, needle_ids[1:-1])  # inner tokens: the edges may merge with neighbours
        per_sample.append(score_sample(model, sample.input_ids, span, max_new_tokens))
    stacked = torch.stack(per_sample)  # (samples, L, Hq)
    return {f"{layer}-{head}": stacked[:, layer, head].tolist()
            for layer in range(stacked.shape[1]) for head in range(stacked.shape[2])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvfactory.retrieval_heads", description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", default="smollm2-135m")
    parser.add_argument("--out", required=True, help="JSON file to write (HeadKV format)")
    parser.add_argument("--num_samples", type=int, default=10)
    parser.add_argument("--length", type=int, default=1000, help="prompt length in tokens")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from kvfactory import models

    model, tokenizer = models.load(args.model_path, attn_implementation="eager")
    scores = retrieval_head_scores(model, tokenizer, num_samples=args.num_samples, length=args.length,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(scores))
    means = sorted(((sum(v) / len(v), k) for k, v in scores.items()), reverse=True)[:5]
    logger.info("top heads: %s", ", ".join(f"{k}={m:.3f}" for m, k in means))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
