"""Provider lookups in progress (shared by concurrent callers) and finished ones (cached briefly).

A FindProviders call either reads a cached answer, follows a lookup of the same key already
running, or starts one; either way the providers reach it as soon as the lookup knows them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from services.discovery.kademlia import Contact


class Flight:
    """One provider lookup's findings so far; any number of followers stream them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.providers: list[Contact] = []
        self.finished = False
        self._ids: set[bytes] = set()
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def full(self) -> bool:
        """Whether `cap` providers are known (the lookup may stop)."""
        return len(self.providers) >= self.cap

    def add(self, providers: Iterable[Contact]) -> None:
        """Records newly found providers (duplicates ignored) and wakes the followers."""
        grew = False
        for provider in providers:
            if self.full or provider.node_id in self._ids:
                continue
            self._ids.add(provider.node_id)
            self.providers.append(provider)
            grew = True
        if grew:
            self._wake()

    def finish(self) -> None:
        """The lookup ended; followers get what is left and stop."""
        self.finished = True
        self._wake()

    def _wake(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    async def follow(self, limit: int) -> AsyncIterator[Contact]:
        """Yields up to `limit` providers, each as soon as it is known."""
        sent = 0
        while True:
            while sent < len(self.providers) and sent < limit:
                yield self.providers[sent]
                sent += 1
            if sent >= limit or self.finished:
                return
            # Shielded: one follower giving up must not cancel the future the others wait on.
            await asyncio.shield(self._changed)


class ProviderCache:
    """Finished lookups' providers per key, each entry valid `ttl` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[bytes, tuple[float, list[Contact]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> list[Contact] | None:
        """The cached providers of `key`, None when absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: bytes, providers: list[Contact], now: float) -> None:
        """Caches a finished lookup's answer. Empty answers are not cached, so a key
        advertised a moment ago is found by the next call rather than a TTL later."""
        if self.ttl <= 0 or not providers:
            return
        self._entries[key] = (now + self.ttl, list(providers))

    def expire(self, now: float) -> None:
        """Forgets expired entries."""
        for key in [k for k, (until, _p) in self._entries.items() if until <= now]:
            del self._entries[key]

    def drop_node(self, node_id: bytes) -> None:
        """A node was found dead: it leaves every cached answer at once."""
        for key, (until, providers) in list(self._entries.items()):
            kept = [p for p in providers if p.node_id != node_id]
            if len(kept) == len(providers):
                continue
            if kept:
                self._entries[key] = (until, kept)
            else:
                del self._entries[key]
