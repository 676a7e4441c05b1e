"""Paired bootstrap intervals: what they resolve and what they refuse."""
from __future__ import annotations

import pytest

from kvfactory.metrics.bootstrap import paired_bootstrap


def test_a_consistent_win_is_resolved_and_a_coin_flip_is_not() -> None:
    always = paired_bootstrap([1.0] * 20, [0.0] * 20)
    assert always.resolved == ">" and always.mean == always.low == always.high == 1.0
    mixed = paired_bootstrap([1, 0] * 10, [0, 1] * 10)
    assert mixed.resolved == "≈" and mixed.mean == 0.0 and mixed.low < 0 < mixed.high
    assert paired_bootstrap([0.0] * 5 + [0.2] * 5, [0.5] * 10).resolved == "<"


def test_few_samples_give_wide_intervals() -> None:
    """4 wins of 5 is not a resolved difference (interval includes 0 at 95%), 5 of 5 is."""
    four = paired_bootstrap([1, 1, 1, 1, 0], [0, 0, 0, 0, 1])
    assert four.low <= 0 < four.high and four.resolved == "≈"
    assert paired_bootstrap([1] * 5, [0] * 5).resolved == ">"


def test_interval_is_reproducible_and_text_is_scaled() -> None:
    a, b = [0.1, 0.4, 0.3, 0.9, 0.5, 0.2], [0.2, 0.1, 0.3, 0.4, 0.5, 0.1]
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)
    assert paired_bootstrap(a, b).text(scale=100, digits=1).startswith("+13.3 [")


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="same samples: got 2 and 1"):
        paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap([], [])
