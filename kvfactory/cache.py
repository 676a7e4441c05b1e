"""``CompressedCache``: a ``transformers.Cache`` holding each layer's kept keys/values at KV-head granularity.

Two lengths are kept apart:

- the **logical** length (tokens seen): what ``get_seq_length()`` answers, so ``generate()``'s ``cache_position``,
  ``position_ids`` and therefore RoPE stay right after eviction;
- the **physical** length per layer (slots held): what attention runs over and what memory costs.

The patched attention of every layer calls :meth:`CompressedCache.forward_layer`: the first call of a layer is its
prefill (attention over the full prompt, then the method compresses what is stored); later calls append, attend over
the physical cache and, with a ``decode_budget``, re-apply the method so the cache stays within budget.

The cache reads only the method contract of :mod:`kvfactory.methods.base` (``layout``, the inputs it needs, its
capacities and decode-time budget) and the store contract of :mod:`kvfactory.storage.base`; it never tests a type.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator

import torch
from transformers.cache_utils import Cache, DynamicCache

from kvfactory.attention import AttentionSpec, attend
from kvfactory.methods.base import Compressor, Kept
from kvfactory.methods.scoring import PrefillAttention
from kvfactory.storage.base import Rotary, StorageFactory, default_storage
from kvfactory.storage.dense import StoreRow

logger = logging.getLogger(__name__)

SCORES = "scores"  # the per-slot accumulator of methods that need decode attention (H2O)


class CompressedCache(Cache):
    """Per-layer compressed KV storage for a patched model (created by ``kvfactory.patch``; see ``PatchHandle``)."""

    def __init__(self, method: Compressor, num_layers: int, spec: AttentionSpec,
                 storage: StorageFactory | None = None, rotary: Rotary | None = None) -> None:
        super().__init__()
        if method.position_shift and (rotary is None or method.layout != "dense"):
            raise ValueError(f"{method.name}: position_shift needs a dense method and the model's RoPE (a cache made "
                             "by handle.new_cache() of a RoPE model)")
        self.method = method
        self.rotary = rotary  # the model's RoPE, for the position shift (keys kept at positions inside the cache)
        self.storage = storage or default_storage()
        self.num_layers = num_layers
        self.spec = spec
        self.stores: list[Any] = [None] * num_layers  # KVStore (kvfactory.storage.base) per layer
        self.query_windows: list[torch.Tensor | None] = [None] * num_layers
        self.prefill_kept: list[list[int]] = [[] for _ in range(num_layers)]  # per layer, per sample
        self.compressions = [0] * num_layers  # decode-time re-compressions per layer
        self.num_query_heads = 0  # known at the first prefill
        self._seen_tokens = 0
        self.sample_lengths: list[int] | None = None  # real (non-padding) tokens seen by each sample
        self.step_valid: torch.Tensor | None = None  # (B, n) validity of the tokens of the forward in flight
        self.step_token_ids: torch.Tensor | None = None  # (B, n) ids of the forward in flight (methods reading them)
        self._step_counts: list[int] = []
        self._step_tokens = 0
        # True while the later chunks of a chunked prefill run: compress to the prefill capacity after each
        self.compressing_chunks = False

    # -- transformers' Cache interface -------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """The logical length: every token this cache has seen, evicted ones included."""
        return self._seen_tokens

    def get_max_length(self) -> int | None:
        return None

    def get_usable_length(self, new_seq_length: int, layer_idx: int | None = 0) -> int:
        return self._seen_tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(
            "CompressedCache is filled by kvfactory's patched attention; an unpatched attention called update(). "
            "Was the patch removed while this cache was still in use?"
        )

    def __len__(self) -> int:
        return sum(store is not None for store in self.stores)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a layer, ``(B, Hkv, T, d)`` (a ragged layer as a left-padded copy, for inspection)."""
        store = self.stores[layer_idx]
        if store is None:
            raise KeyError(f"layer {layer_idx} holds nothing yet")
        return store.key_values()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for layer_idx, store in enumerate(self.stores):
            if store is not None:
                yield self[layer_idx]

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer_idx, store in enumerate(self.stores):
            if store is not None:
                store.reorder(beam_idx)
            window = self.query_windows[layer_idx]
            if window is not None:
                self.query_windows[layer_idx] = window.index_select(0, beam_idx.to(window.device))

    # -- steps (driven by the patched decoder stack) -------------------------------------------------------------
    def begin_step(self, batch_size: int, new_tokens: int, valid: torch.Tensor | None,
                   token_ids: torch.Tensor | None = None) -> None:
        """A forward of ``new_tokens`` per sample starts; ``valid (B, n)`` marks real tokens (None: all real);
        ``token_ids (B, n)`` are its input ids (read by methods whose ``needs_token_ids`` is True)."""
        if self.sample_lengths is not None and len(self.sample_lengths) != batch_size:
            raise ValueError(f"this cache holds a batch of {len(self.sample_lengths)}, the input has {batch_size}")
        if self.method.needs_token_ids and token_ids is None:
            raise ValueError(f"{self.method.name} reads the token ids (separators): call the model with input_ids, "
                             "not inputs_embeds")
        if self.method.position_shift and valid is not None:
            raise ValueError(f"{self.method.name}: position_shift runs unpadded batches only; run padded prompts one "
                             "at a time")
        self.step_valid = valid
        self.step_token_ids = token_ids
        self._step_tokens = new_tokens
        self._step_counts = [new_tokens] * batch_size if valid is None else valid.sum(dim=1).tolist()

    def end_step(self, committed: bool) -> None:
        """The forward finished (``committed``) or failed: advance the logical lengths only in the first case."""
        if committed:
            self._seen_tokens += self._step_tokens
            self.sample_lengths = self._lengths_after_step()
        self.step_valid = None
        self.step_token_ids = None
        self._step_counts = []

    def _lengths_after_step(self) -> list[int]:
        previous = self.sample_lengths or [0] * len(self._step_counts)
        return [a + b for a, b in zip(previous, self._step_counts)]

    # -- reuse of a compressed context (query-agnostic evaluation) ---------------------------------------------
    def mark(self) -> dict[str, Any]:
        """Remember the current contents so :meth:`rollback` can drop everything appended afterwards."""
        layers = [(store, None if store is None else store.snapshot(), None if window is None else window.clone())
                  for store, window in zip(self.stores, self.query_windows)]
        return {"seen": self._seen_tokens, "samples": list(self.sample_lengths or []), "layers": layers,
                "compressions": list(self.compressions)}

    def rollback(self, mark: dict[str, Any]) -> None:
        """Return to ``mark``: appended question/answer tokens are dropped, the compressed context stays."""
        if self.compressions != mark["compressions"]:
            raise RuntimeError("the cache was re-compressed after mark() (decode_budget reached): cannot roll back; "
                               "use a decode_budget larger than context + question + answer")
        for layer_idx, (store, state, window) in enumerate(mark["layers"]):
            if self.stores[layer_idx] is not store:
                raise RuntimeError("the cache was re-compressed after mark() (decode_budget reached): cannot roll back; "
                                   "use a decode_budget larger than context + question + answer")
            if store is not None:
                store.restore(state)
            self.query_windows[layer_idx] = window
        self._seen_tokens = mark["seen"]
        self.sample_lengths = list(mark["samples"]) or None

    # -- what a cache holds ------------------------------------------------------------------------------------
    def kept_tokens(self) -> list[int]:
        """Physical slots per layer (for a batch: the padded row length)."""
        return [0 if store is None else store.length for store in self.stores]

    def mean_kept_tokens(self) -> list[float]:
        """Mean tokens held per KV head, per layer (ragged storage: heads differ; padding not counted)."""
        return [0.0 if store is None else store.mean_kept() for store in self.stores]

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Original positions of the kept tokens ``(B, Hkv, T)`` int32 (-1 marks padding slots; a ragged layer is
        shown left-padded per head)."""
        store = self.stores[layer_idx]
        if store is None:
            raise KeyError(f"layer {layer_idx} holds nothing yet")
        return store.positions

    def nbytes(self) -> int:
        """Every byte held: keys, values, positions, validity, per-slot state, decode query windows."""
        total = sum(store.nbytes() for store in self.stores if store is not None)
        return total + sum(w.untyped_storage().nbytes() for w in self.query_windows if w is not None)

    def step_spec(self) -> AttentionSpec:
        """The attention spec of the step in flight: without the sliding window while every position (bounded on
        the host by the tokens seen, this step's included) is below it, so no layer reads positions back to decide
        whether the window masks anything."""
        window = self.spec.sliding_window
        if window is not None and self._seen_tokens + self._step_tokens <= window:
            return dataclasses.replace(self.spec, sliding_window=None)
        return self.spec

    # -- the patched attention's entry point -------------------------------------------------------------------
    def forward_layer(
        self,
        layer_idx: int,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Attend the new tokens of ``layer_idx`` and update its storage. ``positions`` is ``(B, n)``."""
        valid = None if self.step_valid is None else self.step_valid.to(keys.device)
        store = self.stores[layer_idx]
        if store is None:
            self.num_query_heads = queries.shape[1]
            output, extra = attend(
                queries, keys, values, self.step_spec(), key_valid=valid, query_valid=valid,
                query_positions=positions, key_positions=positions[:, None, :].expand(-1, keys.shape[1], -1),
                need_lse=self.method.uses_prefill_attention, need_column_sums=self.method.uses_prefill_attention,
            )
            # H2O scores the full causal attention: what a sliding window hid from the kernel cannot be reused
            window = self.spec.sliding_window
            reusable = self.method.uses_prefill_attention and extra is not None
            if window is not None and keys.shape[-2] > window:
                reusable = False
            prefill = PrefillAttention.from_kernel(extra, valid) if reusable else None
            self._prefill(layer_idx, queries, keys, values, positions, valid, prefill)
            return output
        if self.method.position_shift:  # rotate the new tokens to their slots: positions inside the cache
            slots = torch.arange(store.length, store.length + keys.shape[-2], device=keys.device)
            shift = (positions - slots).clamp_min(0)
            queries = self.rotary(layer_idx, queries, shift[:, None].expand(-1, queries.shape[1], -1), True)
            keys = self.rotary(layer_idx, keys, shift[:, None].expand(-1, keys.shape[1], -1), True)
        store.append(keys, values, positions, valid)
        if self.method.needs_token_ids:  # the new slots start their accumulators at the method's token marks
            marks = self._marks(keys.shape[1])
            amount = torch.zeros(marks.shape[0], marks.shape[1], store.length, device=marks.device)
            amount[..., -marks.shape[-1]:] = marks
            store.add_to_extra(SCORES, amount)
        needs_weights = self.method.needs_decode_attention
        output, weights = store.attend(queries, self.step_spec(), query_valid=valid, query_positions=positions,
                                       need_weights=needs_weights)
        if needs_weights:
            assert weights is not None
            if valid is not None:
                weights = weights * valid[:, None, None, :, None]
            store.add_to_extra(SCORES, self.method.decode_attention_scores(weights))
        self._remember_queries(layer_idx, queries)
        if self.compressing_chunks:
            self._compress_chunk(layer_idx, queries)
        else:
            self._hold_decode_budget(layer_idx)
        return output

    # -- internals ---------------------------------------------------------------------------------------------
    def _marks(self, heads: int) -> torch.Tensor:
        """The method's token marks of the forward in flight, per KV head ``(B, Hkv, n)``."""
        assert self.step_token_ids is not None
        marks = self.method.token_marks(self.step_token_ids).float()
        return marks[:, None, :].expand(-1, heads, -1)

    @staticmethod
    def _samples(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor | None, prefill: PrefillAttention | None,
                 marks: torch.Tensor | None = None) -> list[tuple[Any, ...]]:
        """The prompt as ``(queries, keys, values, positions, prefill, marks)`` parts: the whole batch when nothing is
        padded, else one part per sample holding only its real tokens (padding never scores and is never kept)."""
        if valid is None:
            return [(queries, keys, values, positions, prefill, marks)]
        parts = []
        for b in range(keys.shape[0]):
            real = valid[b].nonzero().flatten()
            parts.append(tuple(t[b : b + 1].index_select(dim, real)
                               for t, dim in ((queries, 2), (keys, 2), (values, 2), (positions, 1)))
                         + (None if prefill is None else prefill.tokens(b, real),
                            None if marks is None else marks[b : b + 1].index_select(2, real)))
        return parts

    def _prefill(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 positions: torch.Tensor, valid: torch.Tensor | None, prefill: PrefillAttention | None = None) -> None:
        heads = keys.shape[1]
        marks = self._marks(heads) if self.method.needs_token_ids else None
        parts = self._samples(queries, keys, values, positions, valid, prefill, marks)
        if self.method.layout == "ragged":  # each head keeps its own count: ragged storage, no padding
            masked = [
                (part_keys, part_values, part_positions[:, None, :].expand(-1, heads, -1),
                 self.method.select_mask(part_queries, part_keys, part_values, layer_idx=layer_idx,
                                         num_layers=self.num_layers, prefill_attention=part_prefill))
                for part_queries, part_keys, part_values, part_positions, part_prefill, _ in parts
            ]
            store = self.storage.build_ragged(layer_idx, masked)
            self.prefill_kept[layer_idx] = [round(float(keep[b].sum(-1).float().mean())) for *_, keep in masked
                                            for b in range(keep.shape[0])]
        else:
            rows = [self._compress_row(layer_idx, *part) for part in parts]
            store = self.storage.build(layer_idx, rows)
            self.prefill_kept[layer_idx] = [row.keys.shape[-2] for row in rows for _ in range(row.keys.shape[0])]
        self.stores[layer_idx] = store
        window = self.method.query_window_size
        if window:
            self.query_windows[layer_idx] = queries[..., -window:, :].clone()

    def adopt_prefill(self, full: "CompressedCache") -> None:
        """Compress the context ``full`` holds uncompressed (one unpadded prefill, every layer) as if it had been
        prefilled here: KVzip's scratch prefill is the real one, so its keys and values are kept by this cache's
        method instead of running the prefill again. Only for methods whose selection reads no queries (``layout``
        ragged, ``query_window_size`` 0); call inside the step of the prefill (``begin_step``/``end_step``)."""
        if self.method.query_window_size or any(store is not None for store in self.stores):
            raise ValueError(f"{self.method.name}: adopt_prefill needs an empty cache and a method that keeps no "
                             "queries")
        self.num_query_heads = full.num_query_heads
        for layer_idx in range(self.num_layers):
            keys, values = full[layer_idx]
            positions = full.kept_positions(layer_idx)[:, 0].long()
            batch, _, n, dim = keys.shape
            unread = keys.new_zeros(()).expand(batch, self.num_query_heads, n, dim)  # selection reads no queries
            self._prefill(layer_idx, unread, keys, values, positions, None)

    def _compress_chunk(self, layer_idx: int, queries: torch.Tensor) -> None:
        """A chunk of a chunked prefill was appended: compress to the prefill capacity, scoring with its queries."""
        store = self.stores[layer_idx]
        if self.method.layout == "ragged":
            self._hold_headwise_budget(layer_idx, store, None, self.method, 1, queries)
        else:
            self._recompress_dense(layer_idx, store, self.method, None, 1, queries)
        self.prefill_kept[layer_idx] = [round(self.stores[layer_idx].mean_kept())] * queries.shape[0]

    def _hold_headwise_budget(self, layer_idx: int, store: Any, budget: int | None, decoder: Compressor,
                              interval: int, chunk_queries: torch.Tensor | None = None) -> None:
        """Re-apply a head-wise method to each sample holding more than ``Hkv × capacity`` tokens (on a padded view
        cropped to that sample); the other samples keep everything, and the tail is folded into the prefix.
        ``chunk_queries`` (a chunked prefill) replace the kept query window."""
        heads = store.lengths.shape[1]
        totals = store.head_lengths().sum(-1).tolist()
        lengths = self._lengths_after_step()
        capacities = [decoder.capacity(layer_idx, self.num_layers, length, budget) for length in lengths]
        targets = [decoder.layer_token_budget(
            cap, layer_idx, self.num_layers, self.num_query_heads, heads) for cap in capacities]
        over = [b for b, (total, target) in enumerate(zip(totals, targets)) if total > target]
        if store.tail_length < interval or not over:
            return
        keys, values, positions, valid = store.padded()
        keep = valid.clone()
        window = self.query_windows[layer_idx] if chunk_queries is None else chunk_queries
        for b in over:
            start = keys.shape[2] - int(store.head_lengths()[b].max())
            row = (slice(b, b + 1), slice(None), slice(start, None))
            queries = keys[row][..., -1:, :] if window is None else window[b : b + 1]
            keep[row] = decoder.select_mask(
                queries, keys[row], values[row], layer_idx=layer_idx, num_layers=self.num_layers,
                capacity=capacities[b], key_valid=valid[row],
            )
        self.stores[layer_idx] = self.storage.build_ragged(layer_idx, [(keys, values, positions, keep)])
        self.compressions[layer_idx] += 1

    def _compress_row(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      positions: torch.Tensor, prefill: PrefillAttention | None,
                      marks: torch.Tensor | None = None) -> StoreRow:
        """Compress one batch row (or a whole unpadded batch) of a prompt. A method reading token ids starts its
        accumulators at its token marks (plus its prompt attention when it accumulates attention)."""
        accumulated = None
        if marks is not None:
            accumulated = marks
            if self.method.needs_decode_attention:
                accumulated = self.method.token_scores(queries, keys, prefill).float() + marks
        kept = self.method.compress_tokens(queries, keys, values, layer_idx=layer_idx, num_layers=self.num_layers,
                                           prefill_attention=prefill, accumulated=accumulated)
        return self._row(kept, positions[:, None, :].expand(-1, keys.shape[1], -1), queries, keys, prefill,
                         layer_idx)

    def _row(self, kept: Kept, positions: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
             prefill: PrefillAttention | None, layer_idx: int) -> StoreRow:
        """Store the kept tokens with their positions (and H2O-style accumulators when decoding needs them)."""
        extras = {}
        if self.method.needs_decode_attention or self.method.needs_token_ids:
            scores = kept.scores
            if scores is None:  # nothing was evicted: the accumulators start from every token's prompt attention
                scores = self.method.token_scores(queries, keys, prefill).gather(2, kept.indices)
            extras[SCORES] = scores.float()
        return StoreRow(self._shifted(layer_idx, kept), kept.values, positions.gather(2, kept.indices), extras)

    def _shifted(self, layer_idx: int, kept: Kept) -> torch.Tensor:
        """The kept keys, re-rotated from their old slot to their new one under the position shift (slot ``i`` holds a
        key rotated at position ``i``): rotated back by ``old slot - new slot``."""
        if not self.method.position_shift:
            return kept.keys
        moved = kept.indices - torch.arange(kept.indices.shape[-1], device=kept.indices.device)
        if not bool(moved.any()):
            return kept.keys
        return self.rotary(layer_idx, kept.keys, moved, True)

    def _remember_queries(self, layer_idx: int, queries: torch.Tensor) -> None:
        window = self.query_windows[layer_idx]
        if window is not None:
            size = window.shape[-2]
            self.query_windows[layer_idx] = torch.cat([window, queries], dim=-2)[..., -size:, :].clone()

    def _hold_decode_budget(self, layer_idx: int) -> None:
        """Re-apply the method to each sample whose slots reached its capacity + ``compress_interval``."""
        budget = self.method.decode_budget_tokens
        if budget is None:
            return
        store = self.stores[layer_idx]
        assert store is not None
        interval, decoder = self.method.decode_interval, self.method.decode_method
        if self.method.layout == "ragged":
            self._hold_headwise_budget(layer_idx, store, budget, decoder, interval)
        else:
            self._recompress_dense(layer_idx, store, decoder, budget, interval)

    def _recompress_dense(self, layer_idx: int, store: Any, decoder: Compressor, budget: int | None, interval: int,
                          chunk_queries: torch.Tensor | None = None) -> None:
        """Re-apply ``decoder`` to the rows holding at least capacity + ``interval`` slots (``budget`` None: the
        prefill capacity); ``chunk_queries`` (a chunked prefill) replace the kept query window."""
        lengths = self._lengths_after_step()
        capacities = [decoder.capacity(layer_idx, self.num_layers, length, budget) for length in lengths]
        if store.valid is None and len(set(capacities)) == 1:  # one vectorized call for the whole batch
            if store.length < capacities[0] + interval:
                return
            views = [StoreRow(store.keys, store.values, store.positions, {n: store.extra(n) for n in store.extra_names})]
            window = self.query_windows[layer_idx] if chunk_queries is None else chunk_queries
            windows, capacities = [window], capacities[:1]
        else:
            views = [store.row(b) for b in range(len(lengths))]
            if all(view.keys.shape[-2] < cap + interval for view, cap in zip(views, capacities)):
                return
            window = self.query_windows[layer_idx] if chunk_queries is None else chunk_queries
            windows = [None if window is None else window[b : b + 1] for b in range(len(lengths))]
        rows = []
        for view, window, capacity in zip(views, windows, capacities):
            if view.keys.shape[-2] < capacity + interval:
                rows.append(view)
                continue
            # query-free methods never read the queries: the last key stands in as a placeholder
            queries = view.keys[..., -1:, :] if window is None else window
            kept = decoder.compress_tokens(
                queries, view.keys, view.values, layer_idx=layer_idx, num_layers=self.num_layers,
                capacity=capacity, accumulated=view.extras.get(SCORES),
            )
            extras = {SCORES: kept.scores} if SCORES in view.extras and kept.scores is not None else {}
            rows.append(StoreRow(self._shifted(layer_idx, kept), kept.values, view.positions.gather(2, kept.indices),
                                 extras))
        # a chunked prefill rebuilds the store at its kept size (compacting in place would keep the chunk's room)
        self.stores[layer_idx] = store.replace_rows(rows) if chunk_queries is None else self.storage.build(
            layer_idx, rows)
        self.compressions[layer_idx] += 1


def cache_nbytes(past_key_values: Any) -> int:
    """The real bytes a cache holds.

    A :class:`CompressedCache` counts keys, values and all of its bookkeeping (see :meth:`CompressedCache.nbytes`);
    a transformers ``DynamicCache`` or a legacy tuple counts the storage of every tensor once.
    """
    if past_key_values is None:
        return 0
    if isinstance(past_key_values, CompressedCache):
        return past_key_values.nbytes()
    if isinstance(past_key_values, DynamicCache):
        tensors = list(past_key_values.key_cache) + list(past_key_values.value_cache)
    elif isinstance(past_key_values, (tuple, list)):
        tensors = [t for layer in past_key_values for t in (layer if isinstance(layer, (tuple, list)) else [layer])]
    else:
        raise TypeError(
            f"cache_nbytes expects a CompressedCache, a DynamicCache or a tuple of tensors, got {type(past_key_values).__name__}"
        )
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.untyped_storage().nbytes()
    return total
