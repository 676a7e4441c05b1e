"""Quest: keep everything, read only the top-k pages per decode step."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvfactory.methods.base import BudgetedCompressor
from kvfactory.storage.base import ModelContext, StorageFactory
from kvfactory.storage.paged_read import PagedReadStorage


@dataclass(kw_only=True)
class Quest(BudgetedCompressor):
    """Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
    arXiv:2406.10774).

    The cache keeps every token (no memory saving). The keys are cut into pages of ``page_size`` slots; at each
    decode step every query head bounds its logit over a page by ``Σ_c max(q_c·min_c, q_c·max_c)`` (the page's
    per-channel key min/max) and attends only to its ``C // page_size`` best pages, the newest page always among them.
    The saving is bandwidth: the cache reports the key/value bytes each step read (``last_read_bytes`` of each layer's
    store: per KV head the union of its query heads' pages, plus the min/max metadata), not only the bytes held.
    Prefill and multi-token steps attend to everything.

    Parameters
    ----------
    max_capacity_prompt:
        ``C``, the token budget read per decode step and query head (default 512).
    page_size:
        Slots per page (default 16, the paper's).
    skip_layers:
        Layers that read everything (default ``[0, 1]``: the paper does not apply Quest to the first two layers).
    """

    name = "quest"
    page_size: int = 16
    skip_layers: list[int] = field(default_factory=lambda: [0, 1])

    def __post_init__(self) -> None:
        if self.decode_budget is not None:
            raise ValueError("quest keeps every token (its budget is what a decode step reads): decode_budget is not "
                             "accepted; combine eviction and Quest by running an eviction method instead")
        if self.max_capacity_prompt_ratio is not None:
            raise ValueError("quest: give the token budget read per step as max_capacity_prompt (a ratio is not "
                             "accepted)")
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"quest: page_size must be a positive integer, got {self.page_size!r}")
        super().__post_init__()
        if self.max_capacity_prompt < self.page_size:  # type: ignore[operator]
            raise ValueError(f"quest: max_capacity_prompt={self.max_capacity_prompt} must be at least page_size="
                             f"{self.page_size} (one page)")

    def capacity(self, layer_idx: int, num_layers: int, seq_len: int, budget: int | None = None) -> int:
        return seq_len  # everything is kept

    def make_storage(self, context: ModelContext) -> StorageFactory:
        assert self.max_capacity_prompt is not None
        return PagedReadStorage(self.max_capacity_prompt, self.page_size, self.skip_layers)
