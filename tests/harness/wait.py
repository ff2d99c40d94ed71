"""The one way tests wait for a condition: poll it until it holds or a deadline passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class WaitAborted(RuntimeError):
    """The thing a wait depended on is gone (e.g. the process exited): it can never hold."""


def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2) -> bool:
    """Poll `check` until it holds or `timeout` passes; returns whether it held (callers assert)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.2,
    *,
    gone: Callable[[], str | None] | None = None,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll `check` until it holds; TimeoutError naming `what` past `timeout`.

    `gone` says why the wait can no longer succeed (a watched process exited, with its
    output), or None: a reason ends the wait at once with WaitAborted instead of running out
    the clock. `detail` adds what explains a timeout (a log tail, the last answer).
    """

    def holds() -> bool:
        reason = gone() if gone is not None else None
        if reason is not None:
            raise WaitAborted(f"{what}: {reason}")
        return bool(check())

    if not eventually(holds, timeout, interval):
        message = f"{what} not within {timeout} s"
        raise TimeoutError(f"{message}: {detail()}" if detail is not None else message)


async def wait_until(
    condition: Callable[[], Any], within: float, interval: float = 0.05, what: str = "condition"
) -> float:
    """Awaits `condition()` (sync or async) to be truthy; returns the seconds it took.

    Raises TimeoutError naming `what` past `within`: async callers wait inside a running test
    loop, where a raise reads better than an assert on a returned flag.
    """
    started = time.monotonic()
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what} not met within {within} s")
        await asyncio.sleep(interval)
