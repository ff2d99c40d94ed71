"""What every benchmark prints with: progress lines, medians, percentiles and PASS/MISS."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import TypeVar

N = TypeVar("N", int, float)

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One line on stdout, stamped with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:5.0f} s] {message}", flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def median(values: Sequence[float]) -> float:
    """The median; NaN when nothing was measured (it prints, and fails any target, as such)."""
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[N], q: float) -> N:
    """The nearest-rank `q` percentile (0 < q <= 1) of `values`; ValueError when empty."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
