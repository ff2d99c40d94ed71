"""Bounds the work of one archive import: it may handle so many descriptors, and it hands the
event loop back every few, so a hostile archive is refused instead of freezing the pinner."""

from __future__ import annotations

import asyncio

from services.pinner.airgap.layout import LayoutError

CONFIG_KEY = "pinner.max_import_descriptors"
DEFAULT_MAX_DESCRIPTORS = 100_000
# Descriptors handled between two yields to the event loop: each costs microseconds when its
# content is cached (no await that really suspends), so the gRPC API, the advertiser and the
# metrics listener wait at most a few milliseconds.
YIELD_EVERY = 256


class TooManyDescriptorsError(LayoutError):
    """The archive needs more descriptors than one import may handle."""


class DescriptorBudget:
    """Counts the descriptors an import handles; `spend` refuses past `limit` and yields."""

    def __init__(self, limit: int, *, yield_every: int = YIELD_EVERY) -> None:
        self.limit = limit
        self.used = 0
        self._yield_every = yield_every
        self._since_yield = 0

    async def spend(self, count: int = 1) -> None:
        self.used += count
        if self.used > self.limit:
            raise TooManyDescriptorsError(
                f"the archive needs more than {self.limit} descriptors ({CONFIG_KEY}); refused"
            )
        self._since_yield += count
        if self._since_yield >= self._yield_every:
            self._since_yield = 0
            await asyncio.sleep(0)
