"""A base for resources used with ``async with``: entering gives the object, leaving closes it."""

from __future__ import annotations

from collections.abc import Awaitable
from types import TracebackType
from typing import Self


class AsyncClosing:
    """Subclasses define ``close()``; ``async with resource:`` calls it on the way out.

    ``close()`` may be a coroutine (a gRPC channel closes asynchronously) or a plain method: a
    resource released at once (an HTTP response) keeps a sync close so that sync code and
    ``finally`` blocks outside a coroutine can release it too.
    """

    def close(self) -> Awaitable[None] | None:
        """Release what the resource holds; safe to call more than once."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        closing = self.close()
        if closing is not None:
            await closing
