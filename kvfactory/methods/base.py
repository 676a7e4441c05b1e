"""The compressor contract shared by every method.

A compressor decides, for one layer, which tokens of the post-RoPE keys/values stay in the cache:

- ``capacity(layer_idx, num_layers, seq_len, budget)``: how many tokens this layer keeps (PyramidKV varies it);
- ``select(queries, keys, values, capacity=..., ...)``: which ones (ascending positions, per KV head);
- ``kept_key_values(...)``: the kept keys/values themselves (a plain gather, or a merge for CAM / ``merge=``).

``compress(query_states, key_states, value_states, layer_idx, num_layers) -> (keys, values)`` is the model-free unit
that tests and outside parity checks call.

**The contract the cache reads** (``kvfactory/cache.py`` reads nothing else of a method, and never its type):

- ``layout``: ``"dense"`` (every KV head keeps the same count: ``compress_tokens`` returns :class:`Kept`) or
  ``"ragged"`` (each KV head keeps its own count: ``select_mask`` returns a ``(B, Hkv, n)`` keep mask, and
  ``layer_token_budget`` the tokens a whole layer may hold);
- what the method needs as input: ``uses_prefill_attention`` (the prefill kernel's lse / column sums),
  ``needs_decode_attention`` (every decoded token's attention weights, folded per KV head by
  ``decode_attention_scores`` into a per-slot accumulator), ``query_window_size`` (recent queries kept for
  decode-time re-scoring), ``token_scores`` (the accumulators' start when nothing was evicted);
- decoding: ``decode_budget_tokens`` (``None``: the cache grows), ``decode_interval`` and ``decode_method`` (the
  compressor re-applied while decoding: this one unless a decode-time policy names another);
- ``prefill_chunk_size``: prefill long prompts in chunks, compressing after each (read by the patched model);
- ``make_storage(context)``: the storage factory of the cache (dense full precision unless a wrapper quantizes).

Composition (head-wise allocation over any scorer, quantization, decode-time budgets, per-layer budgets) is done by
wrappers over this contract, in :mod:`kvfactory.methods.wrappers`: the cache never knows it is talking to one.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvfactory.methods.merging import MERGE_MODES, merge_evicted
from kvfactory.methods.scoring import GQA_AGGREGATIONS, POOLINGS, PrefillAttention, gather_tokens, reduce_groups
from kvfactory.storage.base import DenseStorage, ModelContext, StorageFactory

logger = logging.getLogger(__name__)

@dataclass
class Selection:
    """Which tokens a layer keeps.

    indices: ``(B, Hkv, k)`` int64 positions in the compressed sequence, ascending per head.
    scores: optional ``(B, Hkv, k)`` fp32 importance of each kept token, carried into decoding (H2O's accumulators).
    """

    indices: torch.Tensor
    scores: torch.Tensor | None = None


@dataclass
class Kept:
    """The outcome of compressing one layer: kept keys/values ``(B, Hkv, k, d)`` and their :class:`Selection`."""

    keys: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor | None = None


def all_positions(keys: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, n)`` indices selecting every token of ``keys``."""
    batch, heads, n, _ = keys.shape
    return torch.arange(n, device=keys.device).expand(batch, heads, n)


def top_past_plus_window(past_scores: torch.Tensor, capacity: int, window_size: int, sinks: int = 0) -> torch.Tensor:
    """Keep the ``capacity - window_size`` best past tokens (the first ``sinks`` always) plus the last ``window_size``.

    ``past_scores`` is ``(B, H, n - W)``; returns ``(B, H, capacity)`` ascending indices into the full sequence.
    """
    batch, heads, past = past_scores.shape
    if sinks:
        past_scores = past_scores.clone()
        past_scores[..., :sinks] = float("inf")
    top = past_scores.topk(capacity - window_size, dim=-1).indices.sort(dim=-1).values
    window = torch.arange(past, past + window_size, device=past_scores.device).expand(batch, heads, window_size)
    return torch.cat([top, window], dim=-1)


def hold_prefill_budget(method: "BudgetedCompressor", stream: bool) -> None:
    """Streaming presets (``stream=True``): without an explicit ``decode_budget``, hold the cache at the prefill budget
    while decoding, as the streaming projects do (their cache never grows)."""
    if stream and method.decode_budget is None:
        if method.max_capacity_prompt is None:
            raise ValueError(f"{method.name}: stream=True holds the cache at max_capacity_prompt; give "
                             "max_capacity_prompt (or decode_budget) rather than max_capacity_prompt_ratio")
        method.decode_budget = method.max_capacity_prompt


LAYOUTS = ("dense", "ragged")


class Compressor:
    """Base of every method. Subclasses are dataclasses whose fields are the method's parameters."""

    name: ClassVar[str] = ""
    layout: ClassVar[str] = "dense"  # "dense": compress_tokens -> Kept; "ragged": select_mask -> per-head keep mask

    # -- the contract -------------------------------------------------------------------------------------------
    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        """Tokens this layer keeps for a sequence of ``seq_len`` (``>= seq_len`` means: evict nothing)."""
        return seq_len

    def select(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        capacity: int,
        layer_idx: int,
        num_layers: int,
        accumulated: torch.Tensor | None = None,
        prefill_attention: PrefillAttention | None = None,
    ) -> Selection:
        """Choose ``capacity`` tokens per KV head. ``accumulated`` holds per-token scores carried from earlier steps;
        ``prefill_attention`` holds what the prefill attention already computed (lse or column sums), if anything."""
        return Selection(all_positions(keys))

    def kept_key_values(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, selection: Selection, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values stored for ``selection`` (a gather; merging methods override)."""
        return gather_tokens(keys, selection.indices), gather_tokens(values, selection.indices)

    # -- decoding -----------------------------------------------------------------------------------------------
    @property
    def decode_budget_tokens(self) -> int | None:
        """Tokens kept per layer while decoding (``None``: the cache grows, as in KVCache-Factory)."""
        return None

    @property
    def query_window_size(self) -> int:
        """How many recent queries decode-time eviction needs (0: none)."""
        return 0

    @property
    def needs_decode_attention(self) -> bool:
        """Whether decode-time eviction needs the attention weights of every decoded token (H2O)."""
        return False

    @property
    def decode_interval(self) -> int:
        """Re-apply the method every this many decoded tokens once the decode budget is reached."""
        return 1

    @property
    def prefill_chunk_size(self) -> int | None:
        """Prefill a longer prompt this many tokens at a time, compressing after each chunk (None: at once)."""
        return None

    @property
    def decode_method(self) -> "Compressor":
        """The compressor the cache re-applies while decoding (its ``capacity``, ``compress_tokens`` or
        ``select_mask``, ``layer_token_budget``): this one unless a decode-time policy names another."""
        return self

    def decode_attention_scores(self, weights: torch.Tensor) -> torch.Tensor:
        """Fold the attention weights of the new tokens, ``(B, Hkv, g, n, T)`` (padded tokens zeroed), into per-slot
        scores ``(B, Hkv, T)`` added to the accumulators (methods whose ``needs_decode_attention`` is True)."""
        return reduce_groups(weights.sum(dim=3), "mean")

    uses_prefill_attention: ClassVar[bool] = False  # whether select reads the prefill attention's lse/column sums
    # whether the patched model runs the method's context-reconstruction passes before the prefill (KVzip: the
    # method then offers reconstruction_passes, begin_sample, observe, end_sample)
    reconstructs_context: ClassVar[bool] = False

    # -- token identities and positions (streaming methods) ------------------------------------------------------
    needs_token_ids: ClassVar[bool] = False  # whether the cache feeds token_marks of every token (SepLLM)

    def token_marks(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Per-token marks ``(B, n)`` float added to the per-slot accumulators of a method whose ``needs_token_ids``
        is True (SepLLM: 1 for a separator token); ``select`` then reads them in ``accumulated``."""
        raise NotImplementedError(f"{self.name} does not read token ids")

    @property
    def position_shift(self) -> bool:
        """Whether attention uses positions inside the cache (StreamingLLM's rolling positions): the cache then keeps
        slot ``i``'s key rotated at position ``i`` and re-rotates the kept keys after every eviction."""
        return False

    def token_scores(self, queries: torch.Tensor, keys: torch.Tensor,
                     prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        """Per-token scores ``(B, Hkv, n)`` that start the decode-time accumulators (methods that need them)."""
        raise NotImplementedError(f"{self.name} keeps no per-token scores")

    # -- running ------------------------------------------------------------------------------------------------
    def compress_tokens(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        layer_idx: int = 0,
        num_layers: int = 1,
        capacity: int | None = None,
        accumulated: torch.Tensor | None = None,
        prefill_attention: PrefillAttention | None = None,
    ) -> Kept:
        """Compress one layer to ``capacity`` tokens (default: the method's own ``capacity``); returns everything
        unchanged when the capacity covers the sequence."""
        n = keys.shape[-2]
        if capacity is None:
            capacity = self.capacity(layer_idx, num_layers, n)
        if capacity >= n:
            return Kept(keys, values, all_positions(keys), accumulated)
        selection = self.select(
            queries, keys, values, capacity=capacity, layer_idx=layer_idx, num_layers=num_layers,
            accumulated=accumulated, prefill_attention=prefill_attention,
        )
        kept_keys, kept_values = self.kept_key_values(queries, keys, values, selection, layer_idx)
        return Kept(kept_keys, kept_values, selection.indices, selection.scores)

    def compress(
        self,
        query_states: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int = 0,
        num_layers: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress post-RoPE ``query (B, Hq, n, d)``, ``key/value (B, Hkv, n, d)``; returns kept keys/values."""
        check_shapes(query_states, key_states, value_states)
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
        kept = self.compress_tokens(
            query_states, key_states, value_states, layer_idx=layer_idx, num_layers=num_layers
        )
        return kept.keys, kept.values

    # -- ragged layout (head-wise methods) ----------------------------------------------------------------------
    def select_mask(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, layer_idx: int = 0,
                    num_layers: int = 1, capacity: int | None = None, key_valid: torch.Tensor | None = None,
                    prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        """Boolean ``(B, Hkv, n)``: the tokens each KV head keeps (methods of ``layout == "ragged"``)."""
        raise NotImplementedError(f"{self.name} has layout {self.layout!r}: it returns Kept from compress_tokens, "
                                  "not a per-head keep mask")

    def layer_token_budget(self, capacity: int, layer_idx: int, num_layers: int, num_query_heads: int,
                           num_kv_heads: int) -> int:
        """Tokens the whole layer holds per sample at ``capacity`` (window included): ``Hkv · capacity``."""
        return num_kv_heads * capacity

    # -- the model ----------------------------------------------------------------------------------------------
    def attach(self, handle: Any) -> None:
        """Called once by ``kvfactory.patch`` with the :class:`~kvfactory.patching.PatchHandle` (its ``model``,
        ``attention_modules`` and ``rotate(layer_idx, states, positions, inverse)``), for methods that read model
        weights, RoPE or the tokenizer (CriticalKV's output projections, Expected Attention's rotary, SepLLM's separators).
        Default: nothing."""

    # -- storage ------------------------------------------------------------------------------------------------
    def make_storage(self, context: ModelContext) -> StorageFactory:
        """The storage factory of a cache running this method (full precision; the quantization wrapper overrides)."""
        return DenseStorage()

    def describe(self) -> dict[str, object]:
        """The method name and every parameter, for run metadata."""
        return {"method": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


def check_shapes(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Raise a clear error unless the tensors are ``(B, Hq, n, d)``, ``(B, Hkv, n, d)``, ``(B, Hkv, n, d)``."""
    if queries.dim() != 4 or keys.dim() != 4 or values.dim() != 4:
        raise ValueError("compress expects 4-D tensors: query (B, Hq, n, d), key/value (B, Hkv, n, d)")
    if keys.shape != values.shape:
        raise ValueError(f"key and value shapes differ: {tuple(keys.shape)} vs {tuple(values.shape)}")
    batch, num_q_heads, n_q, head_dim = queries.shape
    if keys.shape[0] != batch or keys.shape[-1] != head_dim:
        raise ValueError(f"query {tuple(queries.shape)} and key {tuple(keys.shape)} disagree on batch or head_dim")
    if num_q_heads % keys.shape[1]:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({keys.shape[1]})")
    if keys.shape[-2] == 0:
        raise ValueError("cannot compress an empty sequence (the prompt has no tokens)")
    if n_q == 0:
        raise ValueError("at least one query is needed")


@dataclass(kw_only=True)
class BudgetedCompressor(Compressor):
    """A method with a token budget.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, tokens kept per layer and KV head after prefill (window included). Default 512 (KVCache-Factory's
        runner default) unless ``max_capacity_prompt_ratio`` is given. A prompt of at most ``C`` tokens is kept whole.
    max_capacity_prompt_ratio:
        Keep ``round(n · ratio)`` tokens of an ``n``-token prompt instead of a fixed ``C`` (clamped up to the method's
        minimum, e.g. ``window_size + 1``).
    decode_budget:
        Hold the cache at this many tokens per layer while generating (re-applying the method); ``None`` lets the
        cache grow by one token per step, as in KVCache-Factory. For PyramidKV it is the ``C`` of its schedule.
    compress_interval:
        Re-apply the method every this many decoded tokens: the cache then stays within
        ``[decode_budget, decode_budget + compress_interval - 1]``.
    """

    max_capacity_prompt: int | None = None
    max_capacity_prompt_ratio: float | None = None
    decode_budget: int | None = None
    compress_interval: int = 1

    def __post_init__(self) -> None:
        if self.max_capacity_prompt is not None and self.max_capacity_prompt_ratio is not None:
            raise ValueError(f"{self.name}: give max_capacity_prompt or max_capacity_prompt_ratio, not both")
        if self.max_capacity_prompt is None and self.max_capacity_prompt_ratio is None:
            self.max_capacity_prompt = 512
        if self.max_capacity_prompt_ratio is not None and not 0 < self.max_capacity_prompt_ratio <= 1:
            raise ValueError(f"{self.name}: max_capacity_prompt_ratio must be in (0, 1], got {self.max_capacity_prompt_ratio}")
        for field_name in ("max_capacity_prompt", "decode_budget"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or value <= self.min_capacity() - 1):
                raise ValueError(
                    f"{self.name}: {field_name}={value!r} must be an integer of at least {self.min_capacity()} "
                    f"({self.min_capacity_reason()})"
                )
        if not isinstance(self.compress_interval, int) or self.compress_interval < 1:
            raise ValueError(f"{self.name}: compress_interval must be a positive integer, got {self.compress_interval!r}")

    def min_capacity(self) -> int:
        """The smallest budget that still keeps one token beyond the protected ones."""
        return 1

    def min_capacity_reason(self) -> str:
        return "a budget keeps at least one token"

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        if budget is not None:
            return budget
        if self.max_capacity_prompt_ratio is not None:
            return max(round(seq_len * self.max_capacity_prompt_ratio), self.min_capacity())
        assert self.max_capacity_prompt is not None
        return self.max_capacity_prompt

    @property
    def decode_budget_tokens(self) -> int | None:
        return self.decode_budget

    @property
    def decode_interval(self) -> int:
        return self.compress_interval


@dataclass(kw_only=True)
class WindowedCompressor(BudgetedCompressor):
    """Keeps the best ``C - W`` past tokens by a per-token ``score`` plus the observation window (last ``W`` tokens).

    Parameters
    ----------
    window_size:
        ``W``, the most recent tokens, always kept; their queries score the past for query-aware methods.
    gqa_score_agg:
        How the scores of a KV head's query group are combined: ``mean`` (default), ``max`` or ``sum``.
    """

    window_size: int = 8
    gqa_score_agg: str = "mean"

    # Whether ``score`` reads the queries: decode-time eviction then keeps a buffer of the last W queries.
    scores_with_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.window_size, int) or self.window_size < 0:
            raise ValueError(f"{self.name}: window_size must be a non-negative integer, got {self.window_size!r}")
        if self.gqa_score_agg not in GQA_AGGREGATIONS:
            raise ValueError(f"{self.name}: gqa_score_agg must be one of {GQA_AGGREGATIONS}, got {self.gqa_score_agg!r}")
        if getattr(self, "pooling", "maxpool") not in POOLINGS:
            raise ValueError(f"{self.name}: pooling must be one of {POOLINGS}, got {getattr(self, 'pooling')!r}")
        if getattr(self, "kernel_size", 1) < 1:
            raise ValueError(f"{self.name}: kernel_size must be >= 1, got {getattr(self, 'kernel_size')!r}")
        merge = getattr(self, "merge", None)
        if merge is not None and merge not in MERGE_MODES:
            raise ValueError(f"{self.name}: merge must be one of {MERGE_MODES} or None, got {merge!r}")
        super().__post_init__()

    def min_capacity(self) -> int:
        return self.window_size + self.num_sinks() + 1

    def min_capacity_reason(self) -> str:
        return f"larger than window_size={self.window_size}" + (
            f" + sink_size={self.num_sinks()}" if self.num_sinks() else ""
        )

    def num_sinks(self) -> int:
        """Leading tokens that are always kept (H2O's optional sinks)."""
        return 0

    def score(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, layer_idx: int,
        accumulated: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Importance ``(B, Hkv, n - W)`` of every past (non-window) token; higher is kept."""
        raise NotImplementedError

    # whether score() returns attention mass (non-negative, comparable across heads as shares): AdaKV's allocation
    # then normalizes each head's scores by the share of its mass in its top budget
    scores_are_attention_mass: ClassVar[bool] = True

    def past_token_scores(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, layer_idx: int,
                          prefill_attention: PrefillAttention | None = None) -> torch.Tensor:
        """The scorer contract read by head-wise allocation (:class:`~kvfactory.methods.wrappers.HeadwiseAllocation`):
        importance ``(B, Hkv, n - W)`` of every past token, higher kept. ``score`` unless a method overrides."""
        return self.score(queries, keys, values, layer_idx=layer_idx)

    def select(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        capacity: int,
        layer_idx: int,
        num_layers: int,
        accumulated: torch.Tensor | None = None,
        prefill_attention: PrefillAttention | None = None,
    ) -> Selection:
        past_scores = self.score(queries, keys, values, layer_idx=layer_idx, accumulated=accumulated)
        indices = top_past_plus_window(past_scores, capacity, self.window_size, self.num_sinks())
        return Selection(indices)

    def kept_key_values(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, selection: Selection, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        merge = getattr(self, "merge", None)
        if merge is None:
            return super().kept_key_values(queries, keys, values, selection, layer_idx)
        return merge_evicted(keys, values, selection.indices, self.window_size, merge)

    @property
    def query_window_size(self) -> int:
        return self.window_size if self.scores_with_queries and self.decode_budget is not None else 0

    def decode_attention_scores(self, weights: torch.Tensor) -> torch.Tensor:
        return reduce_groups(weights.sum(dim=3), self.gqa_score_agg)
