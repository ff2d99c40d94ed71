"""What every benchmark prints with: progress lines, medians and PASS/MISS (percentiles come
from services/common/percentile.py, which the registry's hedging uses too)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One line on stdout, stamped with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:5.0f} s] {message}", flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def median(values: Sequence[float]) -> float:
    """The median; NaN when nothing was measured (it prints, and fails any target, as such)."""
    return statistics.median(values) if values else float("nan")
