"""Asks the node's discovery service who holds a key, streaming providers as they are found.

A lookup runs in the background for the whole relay: the first provider is used the moment it
arrives, later ones are there for hedges and failovers. Discovery being down or slow is just "no
provider" (the relay answers 404 and containerd falls back), never an error of the request.
"""

from __future__ import annotations

import asyncio
import contextlib

from services.common.cancellation import cancel_and_wait
from services.common.discovery_router import LookupFailed, Router
from services.common.logsetup import get_logger
from services.registry.mirror.hedging import Peer, peer_from_contact

log = get_logger(__name__)


class ProviderLookup:
    """One FindProviders stream, read in the background into `found` (distinct, usable peers)."""

    def __init__(self, router: Router, key: str, limit: int, deadline: float) -> None:
        self.key = key
        self.found: list[Peer] = []
        self.done = False
        self.error: str | None = None
        self._changed = asyncio.Event()
        self._started = asyncio.get_running_loop().time()
        # When the first provider arrived, or the lookup ended without one.
        self._resolved_at: float | None = None
        self._stream = router.lookup(key, limit=limit, deadline=deadline)
        self._limit = limit
        self._task = asyncio.create_task(self._read(), name=f"find-providers {key}")

    async def _read(self) -> None:
        try:
            async for contact in self._stream:
                peer = peer_from_contact(contact.address, contact.registry_port, contact.node_id)
                if peer is None:
                    log.warning(
                        "discovery named an unusable provider",
                        key=self.key,
                        address=contact.address,
                        port=contact.registry_port,
                    )
                    continue
                if peer not in self.found:
                    self.found.append(peer)
                    if self._resolved_at is None:
                        self._resolved_at = asyncio.get_running_loop().time()
                    self._changed.set()
                if len(self.found) >= self._limit:
                    break
        except LookupFailed as err:
            self.error = str(err)
            log.info("provider lookup failed", key=self.key, error=self.error)
        finally:
            # Ends the call when the loop stopped early (enough providers found).
            await self._stream.aclose()
            self.done = True
            self._changed.set()

    async def wait_more(self, known: int, within: float) -> bool:
        """Wait up to `within` seconds until more than `known` providers are found; False when
        the lookup ended or the time ran out first."""
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        while len(self.found) <= known and not self.done:
            left = until - loop.time()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()
        return len(self.found) > known

    def resolve_outcome(self) -> tuple[float, bool]:
        """(seconds until the first provider arrived, or until the lookup ended or was
        stopped without one; whether one was found)."""
        end = self._resolved_at
        if end is None:
            end = asyncio.get_running_loop().time()
        return end - self._started, bool(self.found)

    async def close(self) -> None:
        """Stop the lookup (nothing more is needed from it)."""
        # Bounded: a request must never wait on a lookup that ignores its cancel.
        await cancel_and_wait([self._task], within=1.0, owner="find-providers")
