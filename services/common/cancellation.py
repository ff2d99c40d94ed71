"""Stopping background tasks within a bound: one task ignoring its cancel must not hang a stop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from services.common.logsetup import get_logger

_log = get_logger(__name__)


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any]], *, within: float, owner: str
) -> list[asyncio.Future[Any]]:
    """Cancel ``tasks`` and wait up to ``within`` seconds for them to end.

    Returns the ones still running (logged as an error, naming ``owner``): a stop goes on
    without them rather than waiting for ever. Their results and errors are consumed here.
    """
    every = list(tasks)
    pending = [task for task in every if not task.done()]
    for task in pending:
        task.cancel()
    stuck: set[asyncio.Future[Any]] = set()
    if pending:
        _done, stuck = await asyncio.wait(pending, timeout=within)
    if stuck:
        _log.error(
            "background tasks ignored their cancellation; stopping without them",
            owner=owner,
            within_s=within,
            tasks=sorted(
                task.get_name() if isinstance(task, asyncio.Task) else repr(task) for task in stuck
            ),
        )
    for task in every:
        if task.done() and not task.cancelled():
            # Retrieved so asyncio does not report "exception was never retrieved".
            task.exception()
    return list(stuck)
