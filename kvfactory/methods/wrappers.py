"""Wrappers that compose over any method: head-wise allocation, quantization, decode-time policy, per-layer budgets.

Each wrapper is a :class:`~kvfactory.methods.base.Compressor` holding another one (``inner``) and changing one part of
the contract; the cache cannot tell a wrapper from a method. They nest, innermost first:

``method`` → :class:`PerLayerBudget` → :class:`HeadwiseAllocation` → :class:`DecodingPolicy` →
:class:`ChunkedPrefill` → :class:`PruneAfter` → :class:`Quantized`

and :func:`kvfactory.methods.get` builds the nesting from keyword arguments (one syntax, also the CLIs'
``--method_kwargs``)::

    get("adakv", scorer="h2o", max_capacity_prompt=128)     # AdaKV's allocation over H2O's scores
    get("snapkv", max_capacity_prompt=[256, 128, 64, 64])    # one budget per layer (or a function of the layer)
    get("h2o", decode_method="snapkv", decode_budget=128)    # H2O at prefill, SnapKV re-applied while decoding
    get("adakv", quant_method="kivi", nbits=2)               # anything, head-wise included, quantized
    get("snapkv", prefill_chunk_size=512)                    # prefill 512 tokens at a time, compressing each time
    get("l2norm", max_capacity_prompt_ratio=0.5, prune_after=1000)  # compress only sequences beyond 1,000 tokens

Parameters a wrapper does not own pass through to the method (``wrapper.window_size`` is the inner method's).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch

from kvfactory.methods.adakv import adakv_winners
from kvfactory.methods.base import Compressor, Kept, Selection, check_shapes
from kvfactory.methods.headwise import HeadwiseSelection
from kvfactory.methods.scoring import PrefillAttention
from kvfactory.quant.base import KVQuantizer
from kvfactory.quant.budget import tokens_for_memory
from kvfactory.storage.base import ModelContext, StorageFactory
from kvfactory.storage.quantized import QuantizedStorage


class MethodWrapper(Compressor):
    """Delegates the whole contract to ``inner``; a subclass overrides what it changes. Attributes the contract
    does not name (a method's parameters) are read from ``inner``."""

    def __init__(self, inner: Compressor) -> None:
        if not isinstance(inner, Compressor):
            raise TypeError(f"a wrapper wraps a kvfactory Compressor, got {type(inner).__name__}")
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- the contract, delegated --------------------------------------------------------------------------------
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def layout(self) -> str:  # type: ignore[override]
        return self.inner.layout

    @property
    def uses_prefill_attention(self) -> bool:  # type: ignore[override]
        return self.inner.uses_prefill_attention

    @property
    def reconstructs_context(self) -> bool:  # type: ignore[override]
        return self.inner.reconstructs_context

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        return self.inner.capacity(layer_idx, num_layers, seq_len, budget)

    def select(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, capacity: int,
               layer_idx: int, num_layers: int, accumulated: torch.Tensor | None = None,
               prefill_attention: PrefillAttention | None = None) -> Selection:
        return self.inner.select(queries, keys, values, capacity=capacity, layer_idx=layer_idx,
                                 num_layers=num_layers, accumulated=accumulated, prefill_attention=prefill_attention)

    def kept_key_values(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, selection: Selection,
                        layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.kept_key_values(queries, keys, values, selection, layer_idx)

    def compress_tokens(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, layer_idx: int = 0,
                        num_layers: int = 1, capacity: int | None = None, accumulated: torch.Tensor | None = None,
                        prefill_attention: PrefillAttention | None = None) -> Kept:
        if capacity is None:
            capacity = self.capacity(layer_idx, num_layers, keys.shape[-2])
        return self.inner.compress_tokens(queries, keys, values, layer_idx=layer_idx, num_layers=num_layers,
                                          capacity=capacity, accumulated=accumulated,
                                          prefill_attention=prefill_attention)

    def select_mask(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, layer_idx: int = 0,
                    num_layers: int = 1, capacity: int | None = None, key_valid: torch.Tensor | None = None,
                    prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        if capacity is None:
            capacity = self.capacity(layer_idx, num_layers, keys.shape[-2])
        return self.inner.select_mask(queries, keys, values, layer_idx=layer_idx, num_layers=num_layers,
                                      capacity=capacity, key_valid=key_valid, prefill_attention=prefill_attention)

    def layer_token_budget(self, capacity: int, layer_idx: int, num_layers: int, num_query_heads: int,
                           num_kv_heads: int) -> int:
        return self.inner.layer_token_budget(capacity, layer_idx, num_layers, num_query_heads, num_kv_heads)

    @property
    def decode_budget_tokens(self) -> int | None:
        return self.inner.decode_budget_tokens

    @property
    def decode_interval(self) -> int:
        return self.inner.decode_interval

    @property
    def query_window_size(self) -> int:
        return self.inner.query_window_size

    @property
    def needs_decode_attention(self) -> bool:
        return self.inner.needs_decode_attention

    def decode_attention_scores(self, weights: torch.Tensor) -> torch.Tensor:
        return self.inner.decode_attention_scores(weights)

    @property
    def needs_token_ids(self) -> bool:  # type: ignore[override]
        return self.inner.needs_token_ids

    def token_marks(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.token_marks(token_ids)

    @property
    def position_shift(self) -> bool:
        return self.inner.position_shift

    def token_scores(self, queries: torch.Tensor, keys: torch.Tensor,
                     prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        return self.inner.token_scores(queries, keys, prefill_attention)

    def make_storage(self, context: ModelContext) -> StorageFactory:
        return self.inner.make_storage(context)

    def attach(self, handle: Any) -> None:
        self.inner.attach(handle)

    @property
    def prefill_chunk_size(self) -> int | None:
        return self.inner.prefill_chunk_size

    @property
    def decode_method(self) -> Compressor:
        """This wrapper over the inner method's decode-time method (itself when the inner method has no other)."""
        decoder = self.inner.decode_method
        if decoder is self.inner:
            return self
        clone = copy.copy(self)
        clone.inner = decoder
        return clone

    def compress(self, query_states: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
                 layer_idx: int = 0, num_layers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """As the method's ``compress``; a ragged layout returns the kept keys/values flattened ``(N, d)``."""
        if self.layout != "ragged":
            return Compressor.compress(self, query_states, key_states, value_states, layer_idx, num_layers)
        check_shapes(query_states, key_states, value_states)
        keep = self.select_mask(query_states, key_states, value_states, layer_idx=layer_idx, num_layers=num_layers)
        return key_states[keep], value_states[keep]

    def describe(self) -> dict[str, object]:
        return self.inner.describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


class PerLayerBudget(MethodWrapper):
    """One prefill budget per layer: ``budgets[layer_idx]`` (a list, one entry per layer) or ``budgets(layer_idx,
    num_layers)`` (a function), passed to the method as its ``C`` for that layer (PyramidKV then applies its
    schedule to it, L2Norm still skips its layers). Decode-time budgets are the method's own."""

    def __init__(self, inner: Compressor, budgets: list[int] | tuple[int, ...] | Callable[[int, int], int]) -> None:
        super().__init__(inner)
        if not callable(budgets):
            budgets = list(budgets)
            for value in budgets:
                self._check(value)
        self.budgets = budgets

    def _check(self, value: object) -> int:
        minimum = self.inner.min_capacity() if hasattr(self.inner, "min_capacity") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{self.inner.name}: every per-layer max_capacity_prompt must be an integer of at least "
                             f"{minimum}, got {value!r}")
        return value

    def layer_budget(self, layer_idx: int, num_layers: int) -> int:
        if callable(self.budgets):
            return self._check(self.budgets(layer_idx, num_layers))
        if len(self.budgets) != num_layers:
            raise ValueError(f"{self.inner.name}: max_capacity_prompt lists {len(self.budgets)} budgets, the model has "
                             f"{num_layers} layers; give one per layer")
        return self.budgets[layer_idx]

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        if budget is None:
            budget = self.layer_budget(layer_idx, num_layers)
        return self.inner.capacity(layer_idx, num_layers, seq_len, budget)

    def describe(self) -> dict[str, object]:
        budgets = getattr(self.budgets, "__name__", "function") if callable(self.budgets) else self.budgets
        return {**self.inner.describe(), "max_capacity_prompt": budgets}


class HeadwiseAllocation(HeadwiseSelection, MethodWrapper):
    """AdaKV's head-wise budget allocation (Feng et al. 2024, arXiv:2407.11550) over any scorer's token scores.

    The scorer (``inner``: SnapKV, PyramidKV, H2O, L2Norm, CAM, random, or any method with ``past_token_scores``)
    gives every past token of every KV head a score; with ``B = C − W`` past tokens per head, the layer's top
    ``Hkv · B`` scores are picked (each head's sorted scores first scaled by the share of its mass in its top ``B``
    when ``normalize`` and the scores are attention mass); head ``h`` wins ``n_h`` of them. Every head keeps
    ``F = int(B · floor_ratio)`` plus its share ``n_h / (Hkv · B)`` of the remaining ``Hkv · (B − F)`` tokens, rounded
    by largest remainder so that the layer keeps **exactly** ``Hkv · C`` tokens, window included (AdaKV's own
    ``round(n_h (1 − f) + F)`` may miss by a few). The scorer's capacity (e.g. PyramidKV's per-layer schedule) and
    window apply; its sinks and ``merge`` cannot (a ragged store neither protects nor merges per head).

    Parameters
    ----------
    floor_ratio:
        Share of each head's budget it keeps whatever its scores (default 0.2, as AdaKV).
    normalize:
        Scale each head's scores by its top-``B`` share (default True, as AdaKV; ignored for scores that are not
        attention mass, e.g. L2Norm's minus key norms).
    """

    def __init__(self, inner: Compressor, floor_ratio: float = 0.2, normalize: bool = True) -> None:
        super().__init__(inner)
        if inner.layout != "dense" or not hasattr(inner, "past_token_scores"):
            raise ValueError(f"head-wise allocation needs a scorer with per-token scores (snapkv, pyramidkv, h2o, "
                             f"l2norm, cam, random), got {inner.name!r}")
        if getattr(inner, "num_sinks", lambda: 0)() or getattr(inner, "merge", None) is not None:
            raise ValueError(f"head-wise allocation over {inner.name!r}: sink_size and merge are not supported "
                             "(ragged storage keeps per-head selections only); drop them")
        if inner.uses_prefill_attention and inner.decode_budget_tokens is not None:
            raise ValueError(f"head-wise allocation over {inner.name!r} with decode_budget: its decode-time scores "
                             "need per-slot accumulators, which ragged storage does not keep; use a window scorer "
                             "(snapkv, pyramidkv) or l2norm for decode-time budgets")
        if not isinstance(floor_ratio, (int, float)) or not 0 <= floor_ratio <= 1:
            raise ValueError(f"adakv: floor_ratio must be in [0, 1], got {floor_ratio!r}")
        self.floor_ratio = float(floor_ratio)
        self.normalize = bool(normalize)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "adakv"

    @property
    def layout(self) -> str:  # type: ignore[override]
        return "ragged"

    @property
    def needs_decode_attention(self) -> bool:
        return False  # per-slot accumulators are a dense-layout feature; decode-time re-scoring uses the scorer

    def head_caps(self, past_scores: torch.Tensor, capacity: int) -> torch.Tensor:
        """Past tokens each head keeps, ``(B, Hkv)`` int64, summing to ``Hkv · (C − W)``."""
        heads = past_scores.shape[1]
        budget = capacity - self.inner.window_size
        normalize = self.normalize and self.inner.scores_are_attention_mass
        won = adakv_winners(past_scores, budget, normalize)
        floor = int(budget * self.floor_ratio)
        share = won.double() * (heads * (budget - floor)) / (heads * budget)
        caps = share.floor().long()
        missing = heads * (budget - floor) - caps.sum(-1, keepdim=True)  # < Hkv: one more for the largest remainders
        order = (share - caps).argsort(dim=-1, descending=True, stable=True)
        extra = (torch.arange(heads, device=won.device) < missing).long()
        caps.scatter_add_(-1, order, extra.expand_as(order).contiguous())
        return caps + floor

    def scores_and_caps(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, capacity: int,
                        layer_idx: int, num_layers: int, key_valid: torch.Tensor | None,
                        prefill_attention: PrefillAttention | None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.inner.past_token_scores(queries, keys, values, layer_idx=layer_idx,
                                              prefill_attention=prefill_attention).float()
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[..., : scores.shape[-1]], float("-inf"))
        return scores, self.head_caps(scores, capacity)

    def compress_tokens(self, *args: Any, **kwargs: Any) -> Kept:
        raise NotImplementedError("head-wise allocation keeps a different count per head: use select_mask")

    def describe(self) -> dict[str, object]:
        inner = self.inner.describe()
        return {**inner, "method": "adakv", "scorer": inner["method"], "floor_ratio": self.floor_ratio,
                "normalize": self.normalize}

    def __repr__(self) -> str:
        return f"HeadwiseAllocation({self.inner!r}, floor_ratio={self.floor_ratio}, normalize={self.normalize})"


class DecodingPolicy(MethodWrapper):
    """Hold the cache at ``decode_budget`` tokens per layer while generating, re-applying ``decode_method`` (default:
    the prefill method) every ``compress_interval`` tokens; the prefill is the inner method's (the cache calls
    :attr:`decode_method` while decoding).

    The decode method is a copy of a method with a ``decode_budget`` field (every budgeted method) set to this
    budget, so what it needs while decoding (H2O's per-token accumulators, SnapKV's query window) follows from it.
    Both must share a layout (dense with dense, head-wise with head-wise).
    """

    def __init__(self, inner: Compressor, decode_budget: int, compress_interval: int = 1,
                 decode_method: Compressor | None = None) -> None:
        super().__init__(inner)
        source = decode_method if decode_method is not None else inner
        fields = {f.name for f in dataclasses.fields(source)} if dataclasses.is_dataclass(source) else set()
        if "decode_budget" not in fields:
            raise ValueError(f"decode-time budgets need a method with a budget (snapkv, h2o, streamingllm, ...); "
                             f"{source.name!r} has none")
        if source.layout != inner.layout:
            raise ValueError(f"decode_method {source.name!r} has layout {source.layout!r}, the prefill method "
                             f"{inner.name!r} {inner.layout!r}: they must match")
        self.decoder: Compressor = dataclasses.replace(  # type: ignore[type-var]
            source, decode_budget=decode_budget, compress_interval=compress_interval)

    @property
    def decode_method(self) -> Compressor:
        return self.decoder

    def layer_token_budget(self, capacity: int, layer_idx: int, num_layers: int, num_query_heads: int,
                           num_kv_heads: int) -> int:
        return self.decoder.layer_token_budget(capacity, layer_idx, num_layers, num_query_heads, num_kv_heads)

    @property
    def decode_budget_tokens(self) -> int | None:
        return self.decoder.decode_budget_tokens

    @property
    def decode_interval(self) -> int:
        return self.decoder.decode_interval

    @property
    def query_window_size(self) -> int:
        return self.decoder.query_window_size

    @property
    def needs_decode_attention(self) -> bool:
        return self.decoder.needs_decode_attention

    def decode_attention_scores(self, weights: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_attention_scores(weights)

    def token_scores(self, queries: torch.Tensor, keys: torch.Tensor,
                     prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        return self.decoder.token_scores(queries, keys, prefill_attention)

    def describe(self) -> dict[str, object]:
        decoder = self.decoder.describe()
        return {**self.inner.describe(), "decode_method": decoder["method"], "decode_budget": decoder["decode_budget"],
                "compress_interval": decoder["compress_interval"]}


class ChunkedPrefill(MethodWrapper):
    """Prefill a prompt longer than ``chunk_size`` tokens one chunk at a time, compressing to the method's prefill
    capacity after each chunk, so a layer never holds more than ``C + chunk_size`` tokens (kvpress's ``ChunkPress``
    idea, with the compression carried across chunks). Each chunk attends to the compressed past and to itself; the
    method re-scores the kept tokens plus the new chunk with the chunk's queries (SnapKV: its last ``W``). Methods
    scored by the whole prompt's attention (H2O) cannot be chunked; batches must be unpadded.
    """

    def __init__(self, inner: Compressor, chunk_size: int) -> None:
        super().__init__(inner)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be a positive integer, got {chunk_size!r}")
        if inner.uses_prefill_attention:
            raise ValueError(f"prefill_chunk_size: {inner.name!r} scores tokens with the attention of the whole "
                             "prompt, which a chunked prefill never computes; use a window scorer (snapkv, ...)")
        self.chunk_size = chunk_size

    @property
    def prefill_chunk_size(self) -> int | None:
        return self.chunk_size

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "prefill_chunk_size": self.chunk_size}


class PruneAfter(MethodWrapper):
    """Compress only beyond ``prune_after`` tokens: a sequence of at most ``prune_after`` tokens (prompt, or prompt
    plus generated tokens while decoding) is kept whole; a longer one gets the method's own capacity. kvcompress's
    ``l2_compress`` option ``prune_after`` (docs/predecessors.md), over any method:
    ``get("l2norm", max_capacity_prompt_ratio=r, prune_after=n)`` is its ``l2_compress(keep_ratio=r, prune_after=n)``.
    ``0`` compresses whenever the method would (the wrapper then changes nothing).
    """

    def __init__(self, inner: Compressor, prune_after: int) -> None:
        super().__init__(inner)
        if isinstance(prune_after, bool) or not isinstance(prune_after, int) or prune_after < 0:
            raise ValueError(f"prune_after must be a non-negative integer (tokens kept whole before compressing), "
                             f"got {prune_after!r}")
        self.prune_after = prune_after

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        if seq_len <= self.prune_after:
            return seq_len
        return self.inner.capacity(layer_idx, num_layers, seq_len, budget)

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "prune_after": self.prune_after}


class Quantized(MethodWrapper):
    """Quantize what any method keeps (head-wise included) with a :class:`~kvfactory.quant.base.KVQuantizer`:
    dense layouts in :class:`~kvfactory.storage.quantized.QuantizedStore`, head-wise ones in
    :class:`~kvfactory.storage.quantized.QuantizedRaggedStore`. With the quantizer's ``quant_pruning`` (QPruningKV)
    the method's budget ``C`` is read as the memory of ``C`` 16-bit tokens and each layer keeps as many quantized
    tokens as fit (:func:`~kvfactory.quant.budget.tokens_for_memory`); that needs the model's shape, known once
    :meth:`make_storage` is called by ``kvfactory.patch``.
    """

    def __init__(self, inner: Compressor, quantizer: KVQuantizer) -> None:
        super().__init__(inner)
        if quantizer.quant_pruning and not hasattr(inner, "max_capacity_prompt"):
            raise ValueError(f"quant_pruning spends a token budget as memory; method {inner.name!r} has no budget "
                             "(use e.g. snapkv with max_capacity_prompt)")
        self.quantizer = quantizer
        self.layer_quantizers: list[KVQuantizer | None] | None = None
        self.context: ModelContext | None = None

    def make_storage(self, context: ModelContext) -> StorageFactory:
        self.quantizer.check_head_dim(context.head_dim)
        self.context = context
        self.layer_quantizers = [self.quantizer.for_layer(layer, context.num_layers)
                                 for layer in range(context.num_layers)]
        return QuantizedStorage(self.layer_quantizers, context.rotary, self.quantizer.describe())

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        tokens = self.inner.capacity(layer_idx, num_layers, seq_len, budget)
        if not self.quantizer.quant_pruning or tokens >= seq_len:
            return tokens
        if self.context is None or self.layer_quantizers is None:
            raise RuntimeError("quant_pruning needs the model's shape: patch a model first (kvfactory.patch)")
        dtype_bytes = torch.empty(0, dtype=self.context.dtype).element_size()
        return tokens_for_memory(tokens, self.layer_quantizers[layer_idx], self.context.num_kv_heads,
                                 self.context.head_dim, dtype_bytes)

    def describe(self) -> dict[str, object]:
        description = {**self.inner.describe(), **self.quantizer.describe()}
        return description

    def __repr__(self) -> str:
        return f"Quantized({self.inner!r}, {self.quantizer!r})"
