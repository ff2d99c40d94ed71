"""The nearest-rank percentile: the registry's hedge delay and the benchmarks' figures use it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

N = TypeVar("N", int, float)


def percentile(samples: Iterable[N], q: float) -> N:
    """The nearest-rank `q` percentile (0 < q <= 1) of `samples`; ValueError when empty.

    Nearest-rank returns one of the samples, never an interpolation between two."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
