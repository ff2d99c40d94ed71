"""Fetch leases over the network: finds the node that decides on a key, asks it, remembers.

Two roles in one object. As the deciding node (the closest to a key that answers) it keeps
a LeaseTable and answers peers' Peer lease RPCs. For its own registry it finds the deciding
node of a key with the same lookup that places provider records, asks it (or decides
itself), remembers which leases this node holds and where, and which other node is fetching
a key this node was told to wait for (FindProviders names that node first). A request it
cannot satisfy raises the error kind (services.common.errors) whose status the local caller
gets; the deciding node's own refusals pass through with theirs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.common.config import DiscoverySection
from services.common.errors import (
    InvalidArgumentError,
    NotFoundError,
    PeermirrorError,
    PermissionDeniedError,
    UnavailableError,
    UnimplementedError,
)
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as pb_grpc
from services.common.logsetup import get_logger
from services.discovery.engine import DiscoveryEngine
from services.discovery.kademlia import Contact, dht_key, short_id
from services.discovery.kademlia.leases import FetchLease, LeaseTable, lease_authorities
from services.discovery.lease_rpc import LeaseAuthority
from services.discovery.wire import contact_from_proto, duration, seconds

T = TypeVar("T")
R = TypeVar("R")

log = get_logger(__name__)


def lease_table(section: DiscoverySection) -> LeaseTable:
    """The table of the leases this node decides on, bounded by the section's lease keys."""
    return LeaseTable(
        max_leases=section.max_leases,
        max_per_holder=section.max_leases_per_peer,
        default_ttl=section.lease_ttl,
        # The maximum is at least the default (as the key's description says), so no pair of
        # values is an error an operator could trip over.
        max_ttl=max(section.max_lease_ttl, section.lease_ttl),
    )


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A lease as the local API reports it: `holder` is None when it is this node."""

    granted: bool
    holder: Contact | None
    ttl: float
    # Other nodes told the holder fetches the content (see RenewLeaseResponse.waiters).
    waiters: int = 0


@dataclass
class LeaseCounters:
    """This node's side as asker and holder (the table counts its side as deciding node)."""

    acquired: int = 0
    waits: int = 0
    lost: int = 0
    # Deciding nodes that did not answer, so the next-closest was asked.
    failovers: int = 0


@dataclass(frozen=True, slots=True)
class _Held:
    authority: Contact
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Waiting:
    holder: Contact
    authority: Contact
    expires_at: float


@dataclass(frozen=True, slots=True)
class _State:
    """A deciding node's answer, over the wire or from this node's own table."""

    granted: bool
    holder: Contact | None
    ttl: float
    waiters: int


class LeaseBroker:
    """Fetch leases of one discovery node."""

    def __init__(self, engine: DiscoveryEngine, section: DiscoverySection) -> None:
        self._engine = engine
        self.table = lease_table(section)
        # The Peer servicer answers other nodes' lease RPCs from the same table.
        self.authority = LeaseAuthority(self.table, engine.clock)
        self.counters = LeaseCounters()
        self._held: dict[bytes, _Held] = {}
        self._waiting: dict[bytes, _Waiting] = {}

    def _now(self) -> float:
        return self._engine.clock()

    def _me_for(self, key: bytes) -> Contact:
        """This node as holder: the contact its lease was granted under (its address may
        have been learned since), else its current one."""
        me = self._engine.node.me
        lease = self.table.lease_of(key, me.node_id, self._now())
        return lease.holder if lease is not None else me

    # -- for this node's registry (LocalDiscovery RPCs) --------------------------------

    def in_flight(self, name: str) -> Contact | None:
        """The node this node was told is fetching `name`, while its lease lasts."""
        key = dht_key(name)
        waiting = self._waiting.get(key)
        if waiting is None:
            return None
        if waiting.expires_at <= self._now():
            del self._waiting[key]
            return None
        return waiting.holder

    def held(self) -> int:
        """Unexpired leases this node holds."""
        now = self._now()
        return sum(1 for h in self._held.values() if h.expires_at > now)

    async def acquire(self, name: str, ttl: float, max_waiters: int = 0) -> LeaseView:
        """Ask the deciding node for the lease on `name`, or for the holder to wait for (one
        serving at most `max_waiters` other nodes; 0: no bound)."""
        key = dht_key(name)
        authority, state = await self._ask(
            key,
            self._known_authority(key),
            lambda: self._local_acquire(key, ttl, max_waiters),
            lambda stub, request: stub.AcquireLease(request, timeout=self._timeout),
            ttl,
            max_waiters,
        )
        return self._note(key, authority, state)

    async def renew(self, name: str, ttl: float) -> LeaseView:
        """Extend this node's lease on `name`. A deciding node that lost it (expired, or a
        node that took over from a dead one) grants it again unless another node got it."""
        key = dht_key(name)
        believed = key in self._held
        try:
            authority, state = await self._ask(
                key,
                self._held_authority(key),
                lambda: self._local_renew(key, ttl),
                lambda stub, request: stub.RenewLease(request, timeout=self._timeout),
                ttl,
            )
        except PeermirrorError as exc:
            if isinstance(exc, PermissionDeniedError) and believed:
                self._lose(key, name)
            if not isinstance(exc, NotFoundError) or not believed:
                raise
            # Our lease is gone where it was kept: take it again if still free.
            view = await self.acquire(name, ttl)
            if view.granted:
                return view
            self._lose(key, name)
            raise PermissionDeniedError(
                f"the lease was lost; {view.holder} holds it now", field="key"
            ) from None
        return self._note(key, authority, state)

    async def release(self, name: str) -> bool:
        """End this node's lease on `name`."""
        key = dht_key(name)
        authority = self._held_authority(key)
        self._held.pop(key, None)
        request = pb.PeerLeaseKey(sender=self._engine.sender_info(), key=key)
        _by, released = await self._decide(
            key,
            authority,
            lambda: self.table.release(key, self._me_for(key), self._now()),
            lambda stub: stub.ReleaseLease(request, timeout=self._timeout),
            lambda reply, _candidate: bool(reply.released),
        )
        return released

    async def get(self, name: str) -> LeaseView | None:
        """Who holds the lease on `name` (None: nobody), without asking for it."""
        key = dht_key(name)
        request = pb.PeerLeaseKey(sender=self._engine.sender_info(), key=key)
        _by, state = await self._decide(
            key,
            None,
            lambda: self._local_get(key),
            lambda stub: stub.GetLease(request, timeout=self._timeout),
            _state_of,
        )
        holder = state.holder
        if holder is None:
            return None
        mine = state.granted or holder.node_id == self._engine.node_id
        return LeaseView(mine, None if mine else holder, state.ttl, state.waiters)

    # -- the asking ---------------------------------------------------------------------

    @property
    def _timeout(self) -> float:
        return self._engine.client.rpc_timeout

    def _held_authority(self, key: bytes) -> Contact | None:
        held = self._held.get(key)
        return held.authority if held is not None else None

    def _known_authority(self, key: bytes) -> Contact | None:
        """The node that decided on `key` for this node while its answer lasts: a waiter
        asking again (is the holder still at it?) costs one call, not a lookup."""
        held = self._held_authority(key)
        if held is not None:
            return held
        waiting = self._waiting.get(key)
        if waiting is None or waiting.expires_at <= self._now():
            return None
        return waiting.authority

    async def _candidates(self, key: bytes, first: Contact | None) -> AsyncGenerator[Contact, None]:
        """The node this node's lease was granted by first, then the closest nodes to the key
        a lookup finds, this node among them. Lazy: the lookup runs only when `first` does
        not answer, so a renewal or release costs one call."""
        if first is not None:
            yield first
        found = await self._engine.lookup_nodes(key)
        for contact in lease_authorities(key, self._engine.node.me, found):
            if first is None or contact.node_id != first.node_id:
                yield contact

    async def _ask(
        self,
        key: bytes,
        first: Contact | None,
        local: Callable[[], _State],
        call: Callable[[pb_grpc.PeerAsyncStub, pb.PeerLeaseRequest], Awaitable[pb.PeerLeaseState]],
        ttl: float,
        max_waiters: int = 0,
    ) -> tuple[Contact, _State]:
        """Acquire or renew: `_decide` with a lease request and its state answer."""
        request = pb.PeerLeaseRequest(
            sender=self._engine.sender_info(),
            key=key,
            ttl=duration(ttl),
            max_waiters=max_waiters,
        )
        return await self._decide(key, first, local, lambda stub: call(stub, request), _state_of)

    async def _decide(
        self,
        key: bytes,
        first: Contact | None,
        local: Callable[[], T],
        call: Callable[[pb_grpc.PeerAsyncStub], Awaitable[R]],
        answer: Callable[[R, Contact], T],
    ) -> tuple[Contact, T]:
        """Ask the candidates in order; the first that answers decides (this node's own
        table when it comes first). Returns who decided and what."""
        async with contextlib.aclosing(self._candidates(key, first)) as candidates:
            async for candidate in candidates:
                if candidate.node_id == self._engine.node_id:
                    return candidate, local()
                try:
                    reply = await self._engine.client.call_answered(candidate, call)
                except PeermirrorError as exc:
                    if not isinstance(exc, UnimplementedError):
                        raise _refused(exc) from None
                    # An older node keeps no leases: every newer node skips it alike.
                    reply = None
                if reply is None:
                    self.counters.failovers += 1
                    log.info(
                        "lease authority did not answer; asking the next-closest node",
                        authority=short_id(candidate.node_id),
                    )
                    continue
                return candidate, answer(reply, candidate)
        raise _unavailable()

    def _local_acquire(self, key: bytes, ttl: float, max_waiters: int) -> _State:
        grant = self.table.acquire(key, self._me_for(key), ttl, self._now(), max_waiters)
        return self._state(grant.granted, grant.lease)

    def _local_get(self, key: bytes) -> _State:
        now = self._now()
        lease = self.table.lease_of(key, self._engine.node_id, now) or self.table.get(key, now)
        if lease is None:
            return _State(False, None, 0.0, 0)
        return self._state(lease.holder.node_id == self._engine.node_id, lease)

    def _local_renew(self, key: bytes, ttl: float) -> _State:
        return self._state(True, self.table.renew(key, self._me_for(key), ttl, self._now()))

    def _state(self, granted: bool, lease: FetchLease) -> _State:
        waiters = self.table.waiters(lease.key, lease.holder.node_id)
        return _State(granted, lease.holder, lease.ttl(self._now()), waiters)

    def _note(self, key: bytes, authority: Contact, state: _State) -> LeaseView:
        now = self._now()
        self._prune(now)
        if state.granted:
            self._held[key] = _Held(authority, now + state.ttl)
            self._waiting.pop(key, None)
            self.counters.acquired += 1
            return LeaseView(True, None, state.ttl, state.waiters)
        self._held.pop(key, None)
        if state.holder is not None:
            self._waiting[key] = _Waiting(state.holder, authority, now + state.ttl)
        self.counters.waits += 1
        return LeaseView(False, state.holder, state.ttl, state.waiters)

    def _prune(self, now: float) -> None:
        """Forget leases long expired. A held one is kept a while past its expiry: renewing
        it late still gets it back when nobody took it meanwhile."""
        stale = now - self.table.max_ttl
        for key in [k for k, h in self._held.items() if h.expires_at < stale]:
            del self._held[key]
        for key in [k for k, w in self._waiting.items() if w.expires_at < now]:
            del self._waiting[key]

    def _lose(self, key: bytes, name: str) -> None:
        self._held.pop(key, None)
        self.counters.lost += 1
        log.warning("fetch lease lost: another node holds it now", key=name)


def _state_of(reply: pb.PeerLeaseState, answered_by: Contact) -> _State:
    """A peer's answer. A holder that is the answering node itself is taken as the contact
    we called it at (it may not know its own address)."""
    holder: Contact | None = None
    if reply.HasField("holder"):
        if reply.holder.node_id == answered_by.node_id:
            holder = answered_by
        else:
            holder = contact_from_proto(reply.holder)
    return _State(reply.granted, holder, seconds(reply.ttl), reply.waiters)


def _refused(exc: PeermirrorError) -> PeermirrorError:
    # A refusal of the deciding node passes through; one saying our request was bad is this
    # node's failure to get a decision.
    if isinstance(exc, InvalidArgumentError):
        return UnavailableError(f"the node deciding on this key refused: {exc}")
    return exc


def _unavailable() -> UnavailableError:
    return UnavailableError("no node close to the key answered the lease request")
