"""Latency and memory of one configuration, measured the same way for FullKV, every method and the unpatched model.

A run = a prefill forward (time to first token: the decoder stack on the whole prompt plus the LM head on the last
position only, so the cost of a full-vocabulary logits tensor does not hide the attention's) then ``new_tokens``
greedy decode steps, each timed on its own. TPOT is the median step. The unpatched baseline uses transformers'
``DynamicCache`` (what ``generate`` uses), or legacy tuples for GPT-NeoX in 4.44.2.
"""
from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from kvfactory.cache import CompressedCache, cache_nbytes


@dataclass
class SpeedResult:
    """One measured configuration (seconds, bytes, tokens). Medians over repeats."""

    method: str
    context_length: int
    batch_size: int
    new_tokens: int
    prefill_seconds: float  # = time to first token
    tpot_seconds: float  # median decode step
    decode_seconds: float  # all decode steps
    throughput_tokens_per_second: float  # generated tokens / (prefill + decode), whole batch
    prefill_cache_bytes: int  # right after prefill
    cache_bytes: int  # after the last step
    kept_tokens: float  # mean per layer and head after prefill
    peak_memory_bytes: int  # CUDA max allocated, or the process's peak RSS on CPU (monotonic)
    step_seconds: list[float] = field(default_factory=list, repr=False)

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("step_seconds")
        return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fresh_cache(model: Any) -> Any:
    handle = getattr(model, "_kvfactory_handle", None)
    if handle is not None:
        return handle.new_cache()
    return DynamicCache() if getattr(model, "_supports_cache_class", False) else None


@torch.no_grad()
def run_once(model: Any, input_ids: torch.Tensor, new_tokens: int, attention_mask: torch.Tensor | None = None
             ) -> tuple[float, list[float], Any]:
    """Prefill then ``new_tokens - 1`` decode steps; returns (prefill seconds, step seconds,
    (cache, kept tokens per layer after prefill, cache bytes after prefill))."""
    device = input_ids.device
    decoder, head = model.base_model, model.get_output_embeddings()
    _synchronize(device)
    started = time.perf_counter()
    output = decoder(input_ids, attention_mask=attention_mask, past_key_values=_fresh_cache(model), use_cache=True)
    token = head(output.last_hidden_state[:, -1:]).argmax(-1)
    _synchronize(device)
    prefill = time.perf_counter() - started
    cache = output.past_key_values
    kept = cache.mean_kept_tokens() if isinstance(cache, CompressedCache) else None
    prefill_bytes = cache_nbytes(cache)
    steps = []
    for _ in range(new_tokens - 1):
        started = time.perf_counter()
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        output = decoder(token, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        token = head(output.last_hidden_state[:, -1:]).argmax(-1)
        _synchronize(device)
        steps.append(time.perf_counter() - started)
        cache = output.past_key_values
    return prefill, steps, (cache, kept, prefill_bytes)


def measure(model: Any, input_ids: torch.Tensor, *, method: str, new_tokens: int = 16, repeats: int = 3,
            warmup: int = 1, attention_mask: torch.Tensor | None = None) -> SpeedResult:
    """Median latency of ``repeats`` runs (after ``warmup``) of the model as it is (patched or not); a padded batch
    passes its ``attention_mask``."""
    device = input_ids.device
    for _ in range(warmup):
        run_once(model, input_ids, min(new_tokens, 2), attention_mask)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefills, all_steps = [], []
    cache_state = None
    for _ in range(repeats):
        gc.collect()
        prefill, steps, cache_state = run_once(model, input_ids, new_tokens, attention_mask)
        prefills.append(prefill)
        all_steps.append(steps)
    cache, kept, prefill_bytes = cache_state
    per_run_decode = [sum(steps) for steps in all_steps]
    tpot = statistics.median([s for steps in all_steps for s in steps]) if new_tokens > 1 else 0.0
    prefill = statistics.median(prefills)
    decode = statistics.median(per_run_decode)
    batch, length = input_ids.shape
    return SpeedResult(
        method=method, context_length=length, batch_size=batch, new_tokens=new_tokens, prefill_seconds=prefill,
        tpot_seconds=tpot, decode_seconds=decode,
        throughput_tokens_per_second=batch * new_tokens / (prefill + decode),
        prefill_cache_bytes=prefill_bytes, cache_bytes=cache_nbytes(cache), kept_tokens=sum(kept) / len(kept) if kept else float(length),
        peak_memory_bytes=_peak_memory(device), step_seconds=[s for steps in all_steps for s in steps],
    )
