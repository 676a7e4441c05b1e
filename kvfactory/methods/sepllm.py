"""SepLLM: initial tokens, separator tokens and a recent window."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from kvfactory.methods.base import Selection, WindowedCompressor, hold_prefill_budget, top_past_plus_window

logger = logging.getLogger(__name__)

SEPARATORS = ".,?!;:\n"  # SepLLM's separators (punctuation and line breaks)


def separator_ids(tokenizer: Any, separators: str = SEPARATORS) -> list[int]:
    """Ids of the vocabulary tokens that are separators: tokens whose text, spaces and tabs stripped, is non-empty and
    made only of ``separators`` characters (``"."``, ``" ,"``, ``"\\n\\n"``, ``".\\n"``...)."""
    texts = tokenizer.batch_decode([[token_id] for token_id in range(len(tokenizer))])
    found = [token_id for token_id, text in enumerate(texts)
             if text.strip(" \t") and all(character in separators for character in text.strip(" \t"))]
    if not found:
        raise ValueError(f"no token of this tokenizer's vocabulary is made of the separators {separators!r}")
    return found


def tokenizer_of(model: Any, method: str) -> Any:
    """The tokenizer saved with ``model``'s checkpoint folder, or a clear error."""
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if path and os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    raise ValueError(f"{method} finds its separator tokens in the model's tokenizer, and this model's checkpoint folder "
                     f"({path or 'none'!r}) holds none: pass tokenizer=<the tokenizer> or separator_ids=[...]")


@dataclass(kw_only=True)
class SeparatorTokens:
    """Which tokens are separators: found in a tokenizer's vocabulary (``tokenizer=`` or the model's own, loaded from
    its checkpoint folder by ``attach``, when ``kvfactory.patch`` runs) or given as ``separator_ids``."""

    separators: str = SEPARATORS
    separator_ids: list[int] | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def find_separators(self) -> None:
        if self.separator_ids is None and self.tokenizer is not None:
            self.separator_ids = separator_ids(self.tokenizer, self.separators)

    def attach(self, handle: Any) -> None:
        """Called by ``kvfactory.patch``: without ``separator_ids``, find them in the tokenizer of the checkpoint the
        model was loaded from (``handle.model``)."""
        if self.separator_ids is None:
            self.separator_ids = separator_ids(tokenizer_of(handle.model, self.name), self.separators)  # type: ignore[attr-defined]
            logger.info("%s: %d separator tokens", self.name, len(self.separator_ids))  # type: ignore[attr-defined]

    def is_separator(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.separator_ids is None:
            raise ValueError(f"{self.name} has no separator ids: pass tokenizer= or separator_ids=, or run it through "  # type: ignore[attr-defined]
                             "kvfactory.patch, which reads the model's tokenizer")
        return torch.isin(token_ids, torch.tensor(self.separator_ids, device=token_ids.device))

    def describe(self) -> dict[str, object]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tokenizer"}  # type: ignore[arg-type]
        values["separator_ids"] = None if self.separator_ids is None else len(self.separator_ids)
        return {"method": self.name, **values}  # type: ignore[attr-defined]


def needs_marks(method: str, accumulated: torch.Tensor | None) -> torch.Tensor:
    if accumulated is None:
        raise ValueError(f"{method} selects by token identity: run it through kvfactory.patch (the cache passes the "
                         "separator marks), or pass accumulated=<token_marks per KV head>")
    return accumulated


@dataclass(kw_only=True)
class SepLLM(SeparatorTokens, WindowedCompressor):
    """SepLLM (Chen et al. 2024, "SepLLM: Accelerate Large Language Models by Compressing One Segment into One
    Separator", arXiv:2412.12094), training-free: the first ``sink_size`` tokens, the most recent separator tokens
    (punctuation and line breaks, found in the tokenizer's vocabulary) and the last ``window_size`` tokens, at prefill
    and while decoding. The separator slots are ``C − sink_size − window_size`` (64 by default); when the middle holds
    fewer separators, the remaining slots hold its most recent other tokens, so the cache is always ``C``.

    Parameters
    ----------
    sink_size:
        Initial tokens (default 4).
    window_size:
        Recent tokens (default 256).
    separator_size:
        Separator slots (default 64); sets ``max_capacity_prompt = sink + separators + window`` (324) when that is not
        given.
    separators:
        The separator characters (default ``".,?!;:\\n"``).
    separator_ids:
        The separator token ids (default: found in the tokenizer).
    tokenizer:
        The tokenizer to find them in (default: the model's own, from its checkpoint folder, at ``kvfactory.patch``).
    stream:
        Hold the cache at ``C`` while decoding unless ``decode_budget`` is given (default True).
    position_shift:
        Positions inside the cache (default False).
    decode_budget, compress_interval:
        See :class:`~kvfactory.methods.base.BudgetedCompressor`.
    """

    name = "sepllm"
    needs_token_ids = True
    sink_size: int = 4
    window_size: int = 256
    separator_size: int = 64
    stream: bool = True
    position_shift: bool = False
    scores_are_attention_mass = False

    def __post_init__(self) -> None:
        for name in ("sink_size", "separator_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{self.name}: {name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.max_capacity_prompt is None and self.max_capacity_prompt_ratio is None:
            self.max_capacity_prompt = self.sink_size + self.separator_size + self.window_size + self.extra_slots()
        super().__post_init__()
        hold_prefill_budget(self, self.stream)
        self.find_separators()

    def extra_slots(self) -> int:
        """Slots beyond sinks, separators and window (Unified's heavy hitters)."""
        return 0

    def num_sinks(self) -> int:
        return self.sink_size

    def token_marks(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.is_separator(token_ids).float()

    def select(self, queries, keys, values, *, capacity, layer_idx, num_layers, accumulated=None,
               prefill_attention=None) -> Selection:
        marks = needs_marks(self.name, accumulated)
        past = keys.shape[-2] - self.window_size
        recency = torch.arange(past, device=keys.device) / (2 * past)  # < 0.5: separators (1) first, newest first
        indices = top_past_plus_window(marks[..., :past] + recency, capacity, self.window_size, self.sink_size)
        return Selection(indices, marks.gather(2, indices))
