"""Greedy generation with the measurements every runner records: kept tokens, cache bytes, seconds."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from kvfactory.cache import CompressedCache, cache_nbytes


@dataclass
class GenerationResult:
    """One sample's output.

    text: decoded new tokens (special tokens skipped). new_token_ids: the generated ids (stop token excluded).
    prompt_tokens: real prompt length. kept_tokens: mean per-layer slots this sample kept right after prefill.
    cache_bytes: bytes of the whole cache at the end (shared by the batch). seconds: wall time of the batch.
    """

    text: str
    new_token_ids: list[int]
    prompt_tokens: int
    kept_tokens: float
    cache_bytes: int
    seconds: float
    kept_per_layer: list[int] = field(default_factory=list)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with the prompts left-padded to the longest."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, longest - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] | None = None,
    min_new_tokens: int = 0,
) -> list[GenerationResult]:
    """Greedy-decode a batch of token-id prompts (left-padded) with ``model.generate``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    stops = list(stop_token_ids) if stop_token_ids else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    started = time.perf_counter()
    output = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, eos_token_id=stops,
        pad_token_id=pad_id, return_dict_in_generate=True,
    )
    seconds = time.perf_counter() - started
    cache = output.past_key_values
    kept = cache.prefill_kept if isinstance(cache, CompressedCache) else None  # per layer, per sample
    total_bytes = cache_nbytes(cache) if isinstance(cache, CompressedCache) else 0
    results = []
    for row, prompt in enumerate(prompts):
        new_ids = output.sequences[row, input_ids.shape[1]:].tolist()
        if stops:
            cut = next((i for i, token in enumerate(new_ids) if token in stops), len(new_ids))
            new_ids = new_ids[:cut]
        per_layer = [layer[row] for layer in kept] if kept else []
        results.append(GenerationResult(
            text=tokenizer.decode(new_ids, skip_special_tokens=True),
            new_token_ids=new_ids,
            prompt_tokens=len(prompt),
            kept_tokens=sum(per_layer) / len(per_layer) if per_layer else float(len(prompt)),
            cache_bytes=total_bytes,
            seconds=seconds,
            kept_per_layer=per_layer,
        ))
    return results


@torch.no_grad()
def answer_on_compressed_context(
    model: Any,
    tokenizer: Any,
    handle: Any,
    context_ids: Sequence[int],
    questions: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] | None = None,
) -> list[GenerationResult]:
    """Query-agnostic evaluation: compress ``context_ids`` once (the method never sees a question), then answer each
    question appended after it, rolling the cache back to the compressed context between questions.

    ``handle`` is the ``PatchHandle`` of the patched ``model``. Every question starts from the same compressed
    context, so SnapKV-style methods are judged like query-agnostic ones (kvpress's pipeline protocol).
    """
    if not context_ids:
        raise ValueError("the context is empty")
    device = next(model.parameters()).device
    cache = handle.new_cache()
    started = time.perf_counter()
    model(torch.tensor([list(context_ids)], device=device), past_key_values=cache, use_cache=True)
    context_seconds = time.perf_counter() - started
    kept = cache.mean_kept_tokens()
    mark = cache.mark()
    stops = list(stop_token_ids) if stop_token_ids else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    results = []
    for question in questions:
        full = torch.tensor([list(context_ids) + list(question)], device=device)
        started = time.perf_counter()
        output = model.generate(
            full, attention_mask=torch.ones_like(full), past_key_values=cache, max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, eos_token_id=stops,
            pad_token_id=pad_id,
        )
        seconds = time.perf_counter() - started + context_seconds
        new_ids = output[0, full.shape[1]:].tolist()
        if stops:
            new_ids = new_ids[: next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))]
        results.append(GenerationResult(
            text=tokenizer.decode(new_ids, skip_special_tokens=True), new_token_ids=new_ids,
            prompt_tokens=full.shape[1], kept_tokens=sum(kept) / len(kept), cache_bytes=cache_nbytes(cache),
            seconds=seconds, kept_per_layer=[round(k) for k in kept],
        ))
        cache.rollback(mark)
    return results
