"""The one in-memory Router: a cluster's lease table, recorded Advertise/Withdraw and a provider
table, for unit tests and fault injection of the code above discovery (no gRPC)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from services.common.discovery_router import (
    Holder,
    LeaseAnswer,
    LookupFailed,
    Provider,
    Router,
    RouterState,
)


class LeaseTable:
    """The leases of a whole cluster: one holder per key until it releases or its ttl passes
    without a renewal."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self.held: dict[str, tuple[Holder, float]] = {}
        self.granted: list[tuple[str, Holder]] = []
        self.renewals: list[str] = []
        self.released: list[str] = []
        # (key, max_waiters) of every acquire, in order.
        self.bounds: list[tuple[str, int]] = []
        self.down = False
        # Nodes whose process is gone: nothing they send reaches discovery any more.
        self.crashed: set[Holder] = set()

    def client(self, me: Holder) -> FakeRouter:
        return FakeRouter(self, me)

    def crash(self, node: Holder) -> None:
        """`node` died: its leases stay until their ttl runs out, unrenewed and unreleased."""
        self.crashed.add(node)

    def expire(self, key: str) -> None:
        """The holder of `key` died or stalled: its lease runs out now."""
        self.held.pop(key, None)


@dataclass
class FakeRouter:
    """One node's Router over a shared LeaseTable; advertised keys are recorded, lookups answer
    from `providers` (in-memory: for unit tests of the code above the Router)."""

    table: LeaseTable = field(default_factory=LeaseTable)
    me: Holder = field(default_factory=lambda: Holder("127.0.0.1", 0))
    advertised: list[str] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)
    providers: dict[str, list[Provider]] = field(default_factory=dict)
    started_at: tuple[int, int] = (0, 0)

    async def lookup(
        self, key: str, *, limit: int, deadline: float
    ) -> AsyncGenerator[Provider, None]:
        if self.table.down:
            raise LookupFailed("discovery: UNAVAILABLE: down")
        for contact in self.providers.get(key, [])[:limit]:
            yield contact

    async def advertise(self, keys: Sequence[str]) -> None:
        self.advertised.extend(keys)

    async def withdraw(self, keys: Sequence[str]) -> None:
        self.withdrawn.extend(keys)

    async def list_advertised(self) -> set[str]:
        return set(self.advertised) - set(self.withdrawn)

    async def state(self) -> RouterState | None:
        return RouterState(self.started_at, len(await self.list_advertised()))

    async def close(self) -> None:
        return None

    async def acquire(self, key: str, max_waiters: int = 0) -> LeaseAnswer:
        # One holder per key whatever the bound (the bound's rules are the real table's,
        # services/discovery/kademlia/leases.py); the bound asked for is recorded.
        self.table.bounds.append((key, max_waiters))
        if self.table.down:
            raise ConnectionError("discovery unavailable")
        now = time.monotonic()
        held = self.table.held.get(key)
        if held is not None and held[1] > now and held[0] != self.me:
            return LeaseAnswer(granted=False, holder=held[0])
        self.table.held[key] = (self.me, now + self.table.ttl)
        self.table.granted.append((key, self.me))
        return LeaseAnswer(granted=True, ttl=self.table.ttl)

    async def renew(self, key: str) -> bool:
        if self.me in self.table.crashed:
            raise ConnectionError("this node's process is gone")
        self.table.renewals.append(key)
        held = self.table.held.get(key)
        if held is None or held[0] != self.me:
            return False
        self.table.held[key] = (self.me, time.monotonic() + self.table.ttl)
        return True

    async def release(self, key: str) -> None:
        if self.me in self.table.crashed:
            raise ConnectionError("this node's process is gone")
        held = self.table.held.get(key)
        if held is not None and held[0] == self.me:
            del self.table.held[key]
            self.table.released.append(key)


def _conforms(router: FakeRouter) -> Router:
    return router  # mypy checks here that the fake keeps the Router protocol
