"""The nearest-rank percentile."""

from __future__ import annotations

import pytest

from services.common.percentile import percentile


def test_percentile_is_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 11)]
    assert percentile(samples, 0.9) == 9.0
    assert percentile(samples, 1.0) == 10.0
    assert percentile(samples, 0.01) == 1.0
    assert percentile([5.0], 0.9) == 5.0


def test_whole_numbers_give_a_whole_number() -> None:
    assert percentile([3, 1, 2], 0.5) == 2
    assert isinstance(percentile([3, 1, 2], 0.5), int)


def test_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError):
        percentile([], 0.9)
