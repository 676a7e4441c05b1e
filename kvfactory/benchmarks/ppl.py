"""Perplexity under a compressed cache: *suffix* PPL after a compressed prefix, and *streaming* PPL with a bounded cache.

Suffix mode (one ``max_length`` window): the first ``prefix_ratio`` of the window is prefilled under the method (the
method compresses it); the suffix is then fed **as causal chunks through the compressed cache** (default: one chunk
of the whole suffix; ``suffix_chunk=1`` feeds it token by token). Every suffix token attends to the kept prefix
tokens and to all earlier suffix tokens; the cache's chunk path applies causality by position, so one chunk gives the
same logits as token-by-token feeding (without a ``decode_budget``) at a fraction of the cost. The prefix's own
tokens are not scored; the first suffix token is predicted from the prefix's last logits. Next-token accuracy is the
share of suffix tokens that are the argmax of their logits.

Streaming mode (StreamingLLM's protocol): a long token stream is fed ``chunk_size`` tokens at a time (1: token by
token) through one cache; a method with ``decode_budget`` re-applies itself after every step, so the cache stays
bounded; every token but the first is scored. :func:`chunked_ppl` is the reference without a cache across windows:
FullKV restarted on consecutive windows (the window's first token is fed so that every token is scored once).

Data: :func:`load_documents` (text files, or a ``datasets`` name when online) and :func:`token_stream` (documents
joined with EOS separators); :func:`split_windows` chunks a stream into non-overlapping windows.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from kvfactory.cache import CompressedCache

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "pg_essays"
# name -> (datasets path, config, split, text column, one document per line)
HF_DATASETS: dict[str, tuple[str, str | None, str, str, bool]] = {
    "pg19": ("emozilla/pg19-test", None, "test", "text", False),  # StreamingLLM's eval_long_ppl.py source
    "wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text", True),
}
DATASET_ALIASES = {"wikitext2": "wikitext-2-raw-v1", "wikitext": "wikitext-2-raw-v1"}


# -- data -----------------------------------------------------------------------------------------------------------
def default_data_dir() -> Path | None:
    """``{shared data}/PaulGrahamEssays`` when it exists (see :func:`kvfactory.paths.shared_data_dir`)."""
    from kvfactory.paths import shared_data_dir

    root = shared_data_dir()
    folder = None if root is None else root / "PaulGrahamEssays"
    return folder if folder is not None and folder.is_dir() else None


def read_text_files(folder: str | Path) -> list[str]:
    """Every ``*.txt`` of ``folder`` in sorted name order, UTF-8, with CRLF/CR normalised to LF."""
    path = Path(folder)
    files = sorted(path.glob("*.txt")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no *.txt files in {path}: pass --data_dir with text files "
                                "(e.g. ../shared/data/PaulGrahamEssays) or a dataset name")
    return [f.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n") for f in files]


def load_documents(dataset: str = DEFAULT_DATASET, data_dir: str | Path | None = None,
                   max_documents: int | None = None) -> list[str]:
    """The documents of ``dataset``: ``pg_essays`` (or any name with ``data_dir``: its text files),
    ``pg19`` / ``wikitext-2-raw-v1`` (``datasets``, online; wikitext line by line, empty lines dropped)."""
    name = DATASET_ALIASES.get(dataset, dataset)
    if name in HF_DATASETS:
        import datasets

        path, config, split, column, per_line = HF_DATASETS[name]
        try:
            data = datasets.load_dataset(path, config, split=split, streaming=name == "pg19")
        except Exception as error:  # offline, hub errors: say what was tried
            raise RuntimeError(f"could not load {name} ({path}, {config}) with datasets: {error}; "
                               "it needs the Hugging Face hub (online) or a local cache") from error
        texts: list[str] = []
        for record in data:
            text = record[column]
            if per_line:
                if text.strip():
                    texts.append(text.strip())
            else:
                texts.append(text)
            if max_documents is not None and len(texts) >= max_documents:
                break
        return texts
    folder = Path(data_dir) if data_dir is not None else (default_data_dir() if name == DEFAULT_DATASET else None)
    if folder is None:
        raise ValueError(f"dataset {dataset!r}: pass --data_dir (a folder of .txt files), or use one of "
                         f"{DEFAULT_DATASET} (PG essays in the shared data folder), {', '.join(HF_DATASETS)}")
    texts = read_text_files(folder)
    return texts[:max_documents] if max_documents is not None else texts


def token_stream(tokenizer: Any, documents: Sequence[str], eos_separator: bool = True) -> list[int]:
    """The documents tokenized (no special tokens) and concatenated, each followed by EOS when ``eos_separator``."""
    eos = tokenizer.eos_token_id
    if eos_separator and eos is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_separator=False")
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        if eos_separator:
            stream.append(eos)
    return stream


def split_windows(stream: Sequence[int], max_length: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping ``max_length``-token windows of ``stream`` (an incomplete last window is dropped)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    count = len(stream) // max_length
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than one window of max_length={max_length}")
    return [list(stream[i * max_length : (i + 1) * max_length]) for i in range(count)]


# -- results ----------------------------------------------------------------------------------------------------
@dataclass
class PPLResult:
    """Scored tokens of one configuration. ``ppl`` = exp(mean NLL over all scored tokens)."""

    label: str
    method: str
    params: dict[str, Any]
    nll_sum: float = 0.0
    tokens: int = 0
    correct: int = 0
    windows: int = 0
    kept_tokens: float = 0.0  # mean per layer and KV head (suffix: after the prefix's prefill; streaming: at the end)
    cache_bytes: float = 0.0  # mean after prefill (suffix) / max over the stream (streaming)
    seconds: float = 0.0
    window_nll: list[float] = field(default_factory=list)  # NLL per window (suffix, chunked) / fed chunk (streaming)
    step_seconds: list[float] = field(default_factory=list)  # per fed chunk (streaming)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("window_nll")
        row.pop("step_seconds")
        return {**row, "ppl": self.ppl, "next_token_acc": self.accuracy}


def _score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(NLL sum, correct argmax count) of ``logits (n, V)`` for ``targets (n,)``, in float32."""
    logits = logits.float()
    nll = F.cross_entropy(logits, targets, reduction="sum").item()
    return nll, int((logits.argmax(-1) == targets).sum())


def _patch(model: Any, method: str, params: dict[str, Any]) -> Any:
    import kvfactory

    return kvfactory.patch(model, method, **params)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# -- suffix PPL -------------------------------------------------------------------------------------------------
@torch.no_grad()
def suffix_ppl(model: Any, windows: Sequence[Sequence[int]], *, method: str = "fullkv",
               params: dict[str, Any] | None = None, prefix_ratio: float = 0.5, suffix_chunk: int | None = None,
               label: str = "", progress: bool = True) -> PPLResult:
    """PPL of each window's suffix, scored through the cache left by the method's compressed prefix.

    Parameters
    ----------
    windows:
        Token windows (``split_windows``); the prefix is ``round(len * prefix_ratio)`` tokens of each.
    method, params:
        As for ``kvfactory.patch`` (``max_capacity_prompt_ratio`` for a budget relative to the prefix).
    suffix_chunk:
        Suffix tokens per forward (default: the whole suffix in one causal chunk; 1: token by token).
    """
    from tqdm import tqdm

    if not 0 < prefix_ratio < 1:
        raise ValueError(f"prefix_ratio must be in (0, 1), got {prefix_ratio}")
    params = dict(params or {})
    result = PPLResult(label or method, method, params)
    device = _device(model)
    decoder, head = model.base_model, model.get_output_embeddings()
    kept, nbytes = [], []
    started = time.perf_counter()
    with _patch(model, method, params) as handle:
        for window in tqdm(windows, desc=f"suffix ppl {result.label}", unit="window", disable=not progress):
            ids = torch.tensor([list(window)], device=device)
            prefix = round(ids.shape[1] * prefix_ratio)
            if not 1 <= prefix < ids.shape[1]:
                raise ValueError(f"a {ids.shape[1]}-token window with prefix_ratio {prefix_ratio} leaves no prefix or suffix")
            cache: CompressedCache = handle.new_cache()
            hidden = decoder(ids[:, :prefix], past_key_values=cache, use_cache=True).last_hidden_state
            logits = [head(hidden[:, -1:])[0]]
            kept.append(sum(cache.mean_kept_tokens()) / len(cache.mean_kept_tokens()))
            nbytes.append(cache.nbytes())
            suffix = ids[:, prefix:-1]  # the last token is only a target
            step = suffix.shape[1] if not suffix_chunk else suffix_chunk
            for start in range(0, suffix.shape[1], step):
                hidden = decoder(suffix[:, start : start + step], past_key_values=cache, use_cache=True).last_hidden_state
                logits.append(head(hidden)[0])
            nll, correct = _score(torch.cat(logits), ids[0, prefix:])
            result.nll_sum += nll
            result.tokens += ids.shape[1] - prefix
            result.correct += correct
            result.windows += 1
            result.window_nll.append(nll)
    result.seconds = time.perf_counter() - started
    result.kept_tokens = sum(kept) / len(kept)
    result.cache_bytes = sum(nbytes) / len(nbytes)
    return result


# -- streaming PPL ----------------------------------------------------------------------------------------------
@torch.no_grad()
def streaming_ppl(model: Any, tokens: Sequence[int], *, method: str = "fullkv", params: dict[str, Any] | None = None,
                  chunk_size: int = 1, label: str = "", progress: bool = True,
                  allow_extrapolation: bool = False) -> PPLResult:
    """Feed ``tokens`` ``chunk_size`` at a time through one cache under the method; score every token but the first.

    ``step_seconds`` holds the time of every fed chunk (decoder + LM head), so latency can be plotted against the
    position in the stream; ``cache_bytes`` is the largest cache seen after a step, ``kept_tokens`` the final size.

    A stream longer than the model's ``max_position_embeddings`` needs a method with ``position_shift=True``
    (positions inside the cache, StreamingLLM's rolling positions); otherwise it is a ValueError, unless
    ``allow_extrapolation`` (the keys then keep their true positions, past what the model was trained on).
    """
    from tqdm import tqdm

    if len(tokens) < 2:
        raise ValueError("streaming PPL needs at least 2 tokens")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    limit = getattr(model.config, "max_position_embeddings", None)
    params = dict(params or {})
    result = PPLResult(label or method, method, params, windows=1)
    device = _device(model)
    decoder, head = model.base_model, model.get_output_embeddings()
    ids = torch.tensor([list(tokens)], device=device)
    with _patch(model, method, params) as handle:
        if limit is not None and len(tokens) > limit and not handle.method.position_shift:
            if not allow_extrapolation:
                raise ValueError(
                    f"the stream ({len(tokens)} tokens) runs past the model's max_position_embeddings={limit}, and "
                    f"{method} keeps the true positions: give it position_shift=True (positions inside the cache; "
                    "streamingllm, recent_only, lazy_h2o, sepllm, unified, lazy_unified), stream fewer tokens, or "
                    "pass allow_extrapolation=True to measure position extrapolation")
            logger.warning("%d tokens exceed the model's max_position_embeddings=%d: kept keys keep their true "
                           "positions, so PPL past that point measures position extrapolation too", len(tokens), limit)
        cache: CompressedCache = handle.new_cache()
        fed = ids.shape[1] - 1  # the last token is only a target
        bar = tqdm(total=fed, desc=f"streaming ppl {result.label}", unit="tok", disable=not progress, mininterval=2)
        for start in range(0, fed, chunk_size):
            stop = min(start + chunk_size, fed)
            began = time.perf_counter()
            hidden = decoder(ids[:, start:stop], past_key_values=cache, use_cache=True).last_hidden_state
            logits = head(hidden)[0]
            result.step_seconds.append(time.perf_counter() - began)
            nll, correct = _score(logits, ids[0, start + 1 : stop + 1])
            result.window_nll.append(nll)
            result.nll_sum += nll
            result.correct += correct
            result.tokens += stop - start
            result.cache_bytes = max(result.cache_bytes, float(cache.nbytes()))
            bar.update(stop - start)
        bar.close()
        result.kept_tokens = sum(cache.mean_kept_tokens()) / cache.num_layers
    result.seconds = sum(result.step_seconds)
    return result


@torch.no_grad()
def chunked_ppl(model: Any, tokens: Sequence[int], window: int, *, label: str = "", progress: bool = True
                ) -> PPLResult:
    """FullKV restarted every ``window`` tokens (no cache across windows): window ``k`` feeds tokens
    ``[kW, kW + W)`` and scores ``[kW + 1, kW + W]``, so every token but the first is scored once, as in streaming."""
    from tqdm import tqdm

    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    result = PPLResult(label or f"chunked fullkv (window {window})", "fullkv", {"window": window})
    device = _device(model)
    decoder, head = model.base_model, model.get_output_embeddings()
    ids = torch.tensor([list(tokens)], device=device)
    fed = ids.shape[1] - 1
    started = time.perf_counter()
    for start in tqdm(range(0, fed, window), desc=result.label, unit="window", disable=not progress):
        stop = min(start + window, fed)
        hidden = decoder(ids[:, start:stop], use_cache=False).last_hidden_state
        nll, correct = _score(head(hidden)[0], ids[0, start + 1 : stop + 1])
        result.window_nll.append(nll)
        result.nll_sum += nll
        result.correct += correct
        result.tokens += stop - start
        result.windows += 1
    result.seconds = time.perf_counter() - started
    result.kept_tokens = float(window)
    return result


def _streaming_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the median step times and the PPL change against the streaming FullKV record to every record."""
    import statistics

    full = next((r for r in records if r["method"] == "fullkv" and r["mode"] == "streaming"), None)
    for record in records:
        steps = record["step_seconds"] if record["mode"] == "streaming" else []
        record["step_median_seconds"] = statistics.median(steps) if steps else None
        record["step_median_last_quarter_seconds"] = statistics.median(steps[-max(len(steps) // 4, 1):]) if steps else None
        record["ppl_delta_pct_vs_fullkv"] = 100 * (record["ppl"] / full["ppl"] - 1) if full else None
    return records


def streaming_comparison(model: Any, tokens: Sequence[int], specs: Sequence[Any], *, chunk_size: int = 1,
                         fullkv_chunk_size: int | None = None, baseline_window: int = 256, progress: bool = True,
                         save: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """:func:`streaming_ppl` of every spec (a :class:`kvfactory.benchmarks.speed.MethodSpec`) on the same stream,
    then the :func:`chunked_ppl` baseline (``baseline_window`` 0: none). One record per configuration: the
    :class:`PPLResult` fields (with the per-chunk ``step_seconds`` / ``window_nll`` traces), ``mode``
    (streaming | chunked), ``chunk_size``, the median step time overall and over the last quarter of the stream, and
    the PPL change against the streaming FullKV record in percent. ``save(records so far)`` is called after each.

    ``fullkv_chunk_size`` feeds FullKV that many tokens at a time (default ``chunk_size``): without eviction the
    chunk size does not change its PPL (causal attention), only its latency trace.
    """
    records: list[dict[str, Any]] = []
    for spec in [*specs, None] if baseline_window else specs:
        if spec is None:
            result = chunked_ppl(model, tokens, baseline_window, progress=progress)
            records.append({**vars(result), **result.as_row(), "mode": "chunked", "chunk_size": baseline_window,
                            "window": baseline_window})
        else:
            chunk = fullkv_chunk_size if spec.method == "fullkv" and fullkv_chunk_size else chunk_size
            result = streaming_ppl(model, tokens, method=spec.method, params=spec.params, chunk_size=chunk,
                                   label=spec.label, progress=progress)
            records.append({**vars(result), **result.as_row(), "mode": "streaming", "chunk_size": chunk})
        if save is not None:
            save(_streaming_summary(records))
    return _streaming_summary(records)
