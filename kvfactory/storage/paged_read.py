"""Quest's read path: a dense store whose decode steps attend only to the top pages by a min/max upper bound.

Everything stays stored (memory is not saved); each decode step reads, per KV head, the union over its query heads
of the chosen pages plus the pages' min/max metadata. ``last_read_bytes`` records the key/value bytes that step read
(the bandwidth Quest saves), ``full_read_bytes`` what reading everything would have cost. On CPU the selection is
applied as a mask over the stored keys: the saving is counted, not timed.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from kvfactory.attention import AttentionSpec, build_mask
from kvfactory.storage.dense import DenseStore, StoreRow


def page_upper_bounds(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, page_size: int
                      ) -> torch.Tensor:
    """Quest's bound on ``q·k`` over each page: ``Σ_c max(q_c·min_c, q_c·max_c)``; ``queries (B, Hkv, g, d)``,
    ``keys (B, Hkv, T, d)``, ``valid (B, Hkv, T)``; returns ``(B, Hkv, g, P)`` (pages with no valid key: -inf)."""
    batch, heads, total, dim = keys.shape
    pages = math.ceil(total / page_size)
    pad = pages * page_size - total
    keys = keys.float()
    if valid is None:
        valid = torch.ones(batch, heads, total, dtype=torch.bool, device=keys.device)
    valid = torch.nn.functional.pad(valid, (0, pad), value=False)
    keys = torch.nn.functional.pad(keys, (0, 0, 0, pad))
    paged = keys.view(batch, heads, pages, page_size, dim)
    mask = valid.view(batch, heads, pages, page_size, 1)
    low = paged.masked_fill(~mask, float("inf")).amin(dim=3)  # (B, Hkv, P, d)
    high = paged.masked_fill(~mask, float("-inf")).amax(dim=3)
    q = queries.float()[:, :, :, None, :]  # (B, Hkv, g, 1, d)
    bound = torch.maximum(q * low[:, :, None], q * high[:, :, None]).nan_to_num(nan=0.0).sum(-1)
    return bound.masked_fill(~mask.any(dim=3)[..., 0][:, :, None], float("-inf"))


class PagedReadStore(DenseStore):
    """A :class:`DenseStore` that Quest reads page by page while decoding (set up by :class:`PagedReadStorage`)."""

    token_budget = 0
    page_size = 16
    active = False
    last_read_bytes = 0
    full_read_bytes = 0

    def attend(self, queries: torch.Tensor, spec: AttentionSpec, *, query_valid: torch.Tensor | None = None,
               query_positions: torch.Tensor | None = None, need_weights: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys, values = self.keys, self.values
        batch, num_q_heads, n, dim = queries.shape
        heads, total = keys.shape[1], keys.shape[-2]
        per_token = heads * (keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size())
        self.full_read_bytes = batch * total * per_token
        pages = math.ceil(total / self.page_size)
        chosen = self.token_budget // self.page_size
        if not self.active or n != 1 or chosen >= pages:
            self.last_read_bytes = self.full_read_bytes
            return super().attend(queries, spec, query_valid=query_valid, query_positions=query_positions,
                                  need_weights=need_weights)
        groups = num_q_heads // heads
        mask = build_mask(batch, n, total, keys.device, key_valid=self.valid, query_valid=query_valid,
                          sliding_window=spec.sliding_window, query_positions=query_positions,
                          key_positions=self.positions)
        slot_valid = None if mask is None else mask[:, :, 0, :].expand(batch, heads, total)
        grouped = queries.view(batch, heads, groups, dim)
        bounds = page_upper_bounds(grouped, keys, slot_valid, self.page_size)
        bounds[..., -1] = float("inf")  # the newest page (the current token's) is always read
        top = bounds.topk(max(1, chosen), dim=-1).indices  # (B, Hkv, g, k)
        page_mask = torch.zeros(batch, heads, groups, pages, dtype=torch.bool, device=keys.device)
        page_mask.scatter_(-1, top, True)
        read_pages = page_mask.any(dim=2)  # (B, Hkv, P): a KV head reads the union of its query heads' pages
        slot_counts = torch.full((pages,), self.page_size, device=keys.device)
        slot_counts[-1] = total - (pages - 1) * self.page_size
        token_bytes = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
        metadata = batch * heads * pages * 2 * keys.shape[-1] * keys.element_size()  # min and max per page
        self.last_read_bytes = int((read_pages * slot_counts).sum()) * token_bytes + metadata
        allowed = page_mask.repeat_interleave(self.page_size, dim=-1)[..., :total]  # (B, Hkv, g, T)
        if slot_valid is not None:
            allowed = allowed & slot_valid[:, :, None, :]
        logits = (grouped[..., None, :].float() @ keys.float()[:, :, None].transpose(-1, -2)).squeeze(-2)
        logits = (logits / math.sqrt(dim)).masked_fill(~allowed, torch.finfo(torch.float32).min)
        weights = logits.softmax(dim=-1)  # (B, Hkv, g, T)
        output = (weights.to(values.dtype) @ values).view(batch, num_q_heads, 1, values.shape[-1])
        return output, (weights[:, :, :, None, :] if need_weights else None)


class PagedReadStorage:
    """Builds :class:`PagedReadStore` layers for Quest (``skip_layers`` read everything)."""

    def __init__(self, token_budget: int, page_size: int, skip_layers: list[int]) -> None:
        self.token_budget = token_budget
        self.page_size = page_size
        self.skip_layers = list(skip_layers)

    def build(self, layer_idx: int, rows: list[StoreRow]) -> PagedReadStore:
        store = PagedReadStore.from_rows(rows)
        assert isinstance(store, PagedReadStore)
        store.token_budget, store.page_size = self.token_budget, self.page_size
        store.active = layer_idx not in self.skip_layers
        return store

    def build_ragged(self, layer_idx: int, parts: list[Any]) -> Any:
        raise ValueError("quest reads pages of a dense cache; it does not build head-wise storage")

    def describe(self) -> dict[str, object]:
        return {"storage": "paged-read", "token_budget": self.token_budget, "page_size": self.page_size}
