"""A base for resources used with ``async with``: entering gives the object, leaving closes it."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncClosing:
    """Subclasses define ``async close()``; ``async with resource:`` calls it on the way out."""

    async def close(self) -> None:
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
        await self.close()
