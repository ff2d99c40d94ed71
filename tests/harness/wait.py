"""The one way tests wait for a condition: poll it until it holds or a deadline passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2) -> bool:
    """Poll `check` until it holds or `timeout` passes; returns whether it held (callers assert)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


async def wait_until(condition: Callable[[], Any], within: float, interval: float = 0.05) -> float:
    """Awaits `condition()` (sync or async) to be truthy; returns the seconds it took.

    Raises TimeoutError past `within`: async callers wait inside a running test loop, where a
    raise reads better than an assert on a returned flag.
    """
    started = time.monotonic()
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(interval)
