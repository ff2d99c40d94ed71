"""Drives the Kademlia core over the network: lookups, publishing, maintenance, bootstrap.

The core (services.discovery.kademlia) decides everything; this module only performs what
it asks for with asyncio and the PeerServiceClient, and keeps the node-local API's state
(single-flight provider lookups, the short-lived lookup cache, counters, readiness).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from services.common.cancellation import cancel_and_wait
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.logsetup import get_logger
from services.discovery.bootstrap import (
    BootstrapEndpoint,
    BootstrapSources,
    backoff_delay,
    gather_endpoints,
)
from services.discovery.identity import ServerIdentities
from services.discovery.kademlia import (
    AdvertisedKey,
    Contact,
    DhtConfig,
    DhtNode,
    Lookup,
    dht_key,
    short_id,
)
from services.discovery.peer_client import PeerServiceClient
from services.discovery.provider_cache import Flight, ProviderCache
from services.discovery.rejoin import REJOIN_CAP, RejoinSchedule

A = TypeVar("A")

# FindProviders answers at most this many providers (a request's limit 0 means this).
MAX_PROVIDERS = 20
# Keys published per round: their lookups run concurrently, then one AddProvider batch per
# target node carries all of the round's keys that node is among the closest for.
PUBLISH_ROUND = 64
# Concurrent lookups while publishing or withdrawing.
PUBLISH_CONCURRENCY = 8
# A key that reached no node (no peers yet, all failing) is retried this soon.
PUBLISH_RETRY = 5.0
# Maintenance runs this often at most (faster when probe_interval is very short).
MAX_TICK = 1.0
# How long a stop waits for cancelled background work before going on without it.
STOP_WAIT = 1.0

log = get_logger(__name__)


@dataclass
class Counters:
    """Monotonic counters since start (Stats and tests read them)."""

    lookups: int = 0
    lookup_cache_hits: int = 0
    lookups_empty: int = 0
    network_lookups: int = 0
    keys_published: int = 0
    keys_withdrawn: int = 0
    nodes_dropped: int = 0
    bootstrap_attempts: int = 0
    providers_refused: int = 0


class DiscoveryEngine:
    """One discovery node's DHT at work. Call `start`, then use the local API methods."""

    def __init__(
        self,
        node_id: bytes,
        config: DhtConfig,
        *,
        discovery_port: int,
        registry_port: int,
        address: str = "",
        sources: BootstrapSources | None = None,
        rpc_timeout: float = 1.0,
        lookup_cache_ttl: float = 5.0,
        on_ready: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        channel_credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int | None = None,
        server_identities: ServerIdentities | None = None,
    ) -> None:
        self._clock = clock
        # With mutual TLS every contact heard from proved its address with its certificate, so
        # providers named by other nodes are handed out only once they are such a contact.
        self.verify_providers = channel_credentials is not None
        self.address = address
        self.registry_port = registry_port
        me = Contact(node_id, address, discovery_port, registry_port)
        self.node = DhtNode(me, config, now=clock())
        self.sources = sources or BootstrapSources()
        self.client = PeerServiceClient(
            self.node,
            self.sender_info,
            rpc_timeout=rpc_timeout,
            probe_timeout=config.probe_timeout,
            clock=clock,
            on_dropped=self._node_dropped,
            on_heard=self._node_heard,
            credentials=channel_credentials,
            max_message_bytes=max_message_bytes,
            server_identities=server_identities,
        )
        self.discovery_port = discovery_port
        self.cache = ProviderCache(lookup_cache_ttl)
        self.counters = Counters()
        self.started_at = time.time()
        self.tick = min(MAX_TICK, config.probe_interval / 4)
        self._on_ready = on_ready
        self.ready = asyncio.Event()
        self._flights: dict[bytes, Flight] = {}
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._alone = False
        # Nodes found dead, and when: a lookup that was under way when one was dropped may
        # still hear of it from a node that has not noticed yet, so answers are filtered.
        self._dead: dict[bytes, float] = {}
        self._rng = random.Random()
        # Configured bootstrap addresses missing from the table are pinged again (a restarted
        # bootstrap node knows nobody and would otherwise stay cut off); the list is gathered
        # again every `recheck`, so a peer-list URL is not fetched on every round.
        self._rejoin = RejoinSchedule(
            base=config.probe_interval,
            cap=max(config.probe_interval, REJOIN_CAP),
            recheck=max(config.probe_interval, config.refresh_interval),
            rng=self._rng,
        )
        self._bootstrap_endpoints: list[BootstrapEndpoint] = []
        self._gathered_at: float | None = None
        # Address checks under way, shared by every lookup that was named the same provider.
        self._verifying: dict[bytes, asyncio.Task[Contact | None]] = {}

    # -- identity ---------------------------------------------------------------------

    @property
    def node_id(self) -> bytes:
        """This node's ID."""
        return self.node.node_id

    @property
    def clock(self) -> Callable[[], float]:
        """The clock the core runs on (the Peer servicer must read the same one)."""
        return self._clock

    def set_discovery_port(self, port: int) -> None:
        """The Peer service's bound port (known only once it listens when asked for port 0)."""
        self.discovery_port = port
        self._set_me()

    def _set_me(self) -> None:
        self.node.me = Contact(self.node_id, self.address, self.discovery_port, self.registry_port)

    def sender_info(self) -> pb.SenderInfo:
        """What our requests say about us."""
        return pb.SenderInfo(
            node_id=self.node_id,
            discovery_port=self.discovery_port,
            registry_port=self.registry_port,
        )

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Starts maintenance and bootstrap in the background."""
        self._tasks = [
            asyncio.create_task(self._maintenance_loop(), name="discovery-maintenance"),
            asyncio.create_task(self._join_loop(), name="discovery-join"),
        ]

    async def stop(self) -> None:
        """Stops background work and closes every channel. Records we published are not
        withdrawn: other nodes drop them when our pings stop answering (within the
        liveness window), which also covers a crash, so a clean stop needs no extra path."""
        await cancel_and_wait(self._tasks, within=STOP_WAIT, owner="discovery-engine")
        for flight in self._flights.values():
            flight.finish()
        checks = list(self._verifying.values())
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        await self.client.close()

    # -- node-local API ---------------------------------------------------------------

    def advertise(self, names: Iterable[str]) -> tuple[int, int]:
        """Starts providing keys (published in the background); returns (added, total)."""
        added = self.node.advertised.add(names, self._clock())
        if added:
            self._wake.set()
        return added, len(self.node.advertised)

    def withdraw(self, names: Iterable[str]) -> tuple[int, int]:
        """Stops providing keys and sends removals in the background; returns (removed, total)."""
        removed = self.node.advertised.remove(names)
        if removed:
            self.client.spawn(self._send_removals(removed))
        return len(removed), len(self.node.advertised)

    def advertised(self) -> list[str]:
        """The keys this node provides."""
        return list(self.node.advertised)

    async def find_providers(self, name: str, limit: int = 0) -> AsyncIterator[Contact]:
        """Providers of key string `name` other than this node, each yielded as soon as
        known: from the cache, from a lookup of the same key already running, or from a
        new lookup that other callers may then share."""
        wanted = MAX_PROVIDERS if limit <= 0 else min(limit, MAX_PROVIDERS)
        key = dht_key(name)
        self.counters.lookups += 1
        found = 0
        cached = self.cache.get(key, self._clock())
        if cached is not None:
            self.counters.lookup_cache_hits += 1
            for provider in cached[:wanted]:
                found += 1
                yield provider
            return
        flight = self._flights.get(key)
        if flight is not None:
            self.counters.lookup_cache_hits += 1
        else:
            flight = Flight(MAX_PROVIDERS)
            self._flights[key] = flight
            self.client.spawn(self._fly(key, flight))
        try:
            async for provider in flight.follow(wanted):
                found += 1
                yield provider
        finally:
            if found == 0:
                self.counters.lookups_empty += 1

    async def _fly(self, key: bytes, flight: Flight) -> None:
        """Runs the one network lookup behind a flight; records held here count first."""
        try:
            now = self._clock()
            local = self.node.store.get(key, now, limit=MAX_PROVIDERS, exclude=self.node_id)
            flight.add(r.provider for r in local)
            checks: set[asyncio.Task[None]] = set()
            if not flight.full:
                self.counters.network_lookups += 1
                lookup = self.node.start_lookup(
                    key, now, find_providers=True, provider_limit=MAX_PROVIDERS
                )
                try:
                    await self._drive(
                        lookup,
                        lambda c: self.client.get_providers(c, key, MAX_PROVIDERS),
                        lambda c, a: lookup.on_response(c, a.closer, a.providers),
                        on_fresh=lambda fresh: self._admit(flight, fresh, checks),
                        until=lambda: flight.full,
                    )
                    if checks:
                        await asyncio.gather(*checks, return_exceptions=True)
                finally:
                    for task in checks:
                        task.cancel()
        finally:
            flight.finish()
            if self._flights.get(key) is flight:
                del self._flights[key]
            self.cache.put(key, self._alive(flight.providers), self._clock())

    def _admit(
        self, flight: Flight, fresh: Iterable[Contact], checks: set[asyncio.Task[None]]
    ) -> None:
        """Add providers another node named to `flight`: at once when they are contacts this
        node authenticated (taken with the ports that contact declared itself), after a ping
        over mutual TLS proves their address otherwise (taken as they answered it, whether
        or not their bucket had room); never a contact that fails it."""
        alive = self._alive(fresh)
        if not self.verify_providers:
            flight.add(alive)
            return
        known: list[Contact] = []
        for provider in alive:
            contact = self.node.table.get(provider.node_id)
            if contact is not None and contact.address == provider.address:
                known.append(contact)
                continue
            check = self._verifying.get(provider.node_id)
            if check is None:
                check = asyncio.get_running_loop().create_task(self._verify(provider))
                self._verifying[provider.node_id] = check
                check.add_done_callback(functools.partial(self._check_done, provider.node_id))
            task = asyncio.get_running_loop().create_task(self._add_verified(flight, check))
            checks.add(task)
            task.add_done_callback(checks.discard)
        flight.add(known)

    def _check_done(self, node_id: bytes, check: asyncio.Task[Contact | None]) -> None:
        if self._verifying.get(node_id) is check:
            del self._verifying[node_id]

    async def _verify(self, provider: Contact) -> Contact | None:
        """Ping `provider` over mutual TLS: the node as it answered (its own ports) when the
        node with its ID answered there."""
        answered = await self.client.ping_as(provider)
        if answered is not None:
            return answered
        self.counters.providers_refused += 1
        log.info(
            "provider named by a peer did not prove its address; not used",
            provider=short_id(provider.node_id),
            address=provider.address,
        )
        return None

    async def _add_verified(self, flight: Flight, check: asyncio.Task[Contact | None]) -> None:
        # Shielded: one lookup ending must not cancel a check another lookup waits for.
        answered = await asyncio.shield(check)
        if answered is not None:
            flight.add([answered])

    # -- lookups ----------------------------------------------------------------------

    async def lookup_nodes(self, target: bytes) -> list[Contact]:
        """Iterative node lookup: the k closest live nodes to `target`."""
        lookup = self.node.start_lookup(target, self._clock())
        await self._drive(
            lookup,
            lambda c: self.client.find_node(c, target),
            lambda c, closer: lookup.on_response(c, closer),
        )
        return lookup.result()

    async def lookup_providers(self, key: bytes, limit: int | None = None) -> Lookup:
        """Network provider lookup of DHT key `key`, bypassing records held here and the
        cache (benchmarks measure the network path with it)."""
        lookup = self.node.start_lookup(
            key, self._clock(), find_providers=True, provider_limit=limit
        )
        await self._drive(
            lookup,
            lambda c: self.client.get_providers(c, key, limit or 0),
            lambda c, a: lookup.on_response(c, a.closer, a.providers),
        )
        return lookup

    async def _drive(
        self,
        lookup: Lookup,
        query: Callable[[Contact], Coroutine[Any, Any, A | None]],
        answer: Callable[[Contact, A], list[Contact]],
        *,
        on_fresh: Callable[[list[Contact]], None] | None = None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        """Runs `lookup` to its end, at most alpha queries in flight; queries still in
        flight at the end are cancelled (not failures: nobody was found dead)."""
        in_flight: dict[asyncio.Task[A | None], Contact] = {}
        try:
            while True:
                for contact in lookup.next_queries():
                    in_flight[asyncio.create_task(query(contact))] = contact
                if not in_flight:
                    return
                done, _pending = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    contact = in_flight.pop(task)
                    reply = task.result()
                    if reply is None:
                        lookup.on_failure(contact)
                        continue
                    fresh = answer(contact, reply)
                    if fresh and on_fresh is not None:
                        on_fresh(fresh)
                if lookup.done or (until is not None and until()):
                    return
        finally:
            for task in in_flight:
                task.cancel()

    # -- publishing -------------------------------------------------------------------

    async def _closest_all(self, keys: Sequence[bytes]) -> list[list[Contact]]:
        limit = asyncio.Semaphore(PUBLISH_CONCURRENCY)

        async def one(key: bytes) -> list[Contact]:
            async with limit:
                return await self.lookup_nodes(key)

        return await asyncio.gather(*(one(k) for k in keys))

    async def _publish(self, items: Sequence[AdvertisedKey]) -> None:
        """AddProvider of `items` at the k closest nodes of each, in batches per node."""
        ttl = self.node.config.record_ttl
        for start in range(0, len(items), PUBLISH_ROUND):
            chunk = items[start : start + PUBLISH_ROUND]
            closest = await self._closest_all([item.key for item in chunk])
            async with self._send_lock:
                # Under the lock and after the lookups: a key withdrawn meanwhile is not
                # published after its removals went out.
                live = [
                    (item, nodes)
                    for item, nodes in zip(chunk, closest, strict=True)
                    if item.name in self.node.advertised
                ]
                stored = await self._send_batches(
                    live, lambda c, keys: self.client.add_provider(c, keys, ttl)
                )
            self.counters.keys_published += len(stored)
            missed = [item.name for item, _nodes in live if item.key not in stored]
            if missed:
                self.node.advertised.retry(missed, self._clock() + PUBLISH_RETRY)

    async def _send_removals(self, items: Sequence[AdvertisedKey]) -> None:
        """RemoveProvider of `items` at the k closest nodes of each."""
        for start in range(0, len(items), PUBLISH_ROUND):
            chunk = items[start : start + PUBLISH_ROUND]
            closest = await self._closest_all([item.key for item in chunk])
            async with self._send_lock:
                done = await self._send_batches(
                    list(zip(chunk, closest, strict=True)), self.client.remove_provider
                )
            self.counters.keys_withdrawn += len(done)

    async def _send_batches(
        self,
        placed: Sequence[tuple[AdvertisedKey, list[Contact]]],
        send: Callable[[Contact, list[bytes]], Awaitable[int | None]],
    ) -> set[bytes]:
        """One call per node carrying every key it is among the closest for (split at the
        batch cap); returns the keys at least one node accepted."""
        per_node: dict[bytes, tuple[Contact, list[bytes]]] = {}
        for item, nodes in placed:
            for contact in nodes:
                per_node.setdefault(contact.node_id, (contact, []))[1].append(item.key)
        cap = self.node.config.max_batch_keys
        calls: list[tuple[list[bytes], Awaitable[int | None]]] = []
        for contact, keys in per_node.values():
            for i in range(0, len(keys), cap):
                batch = keys[i : i + cap]
                calls.append((batch, send(contact, batch)))
        results = await asyncio.gather(*(call for _batch, call in calls))
        accepted: set[bytes] = set()
        for (batch, _call), result in zip(calls, results, strict=True):
            if result is not None:
                accepted.update(batch)
        return accepted

    # -- maintenance ------------------------------------------------------------------

    def _alive(self, providers: Iterable[Contact]) -> list[Contact]:
        dead = self._dead
        return [p for p in providers if p.node_id not in dead]

    def _node_heard(self, node_id: bytes) -> None:
        if self._dead:
            self._dead.pop(node_id, None)

    def _node_dropped(self, node_id: bytes) -> None:
        self.counters.nodes_dropped += 1
        self._dead[node_id] = self._clock()
        self.cache.drop_node(node_id)
        log.debug("peer dropped", peer=short_id(node_id))

    async def _maintenance_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that lands
            # while the wake-up is being delivered, and this loop then never ends (stop hung).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick):
                    await self._wake.wait()
            self._wake.clear()
            self._maintain()
            await self._check_ready()

    def _maintain(self) -> None:
        now = self._clock()
        work = self.node.maintenance(now)
        for contact in work.probes:
            self.client.spawn(self.client.ping(contact))
        for node_id in work.dropped:
            self.client.node_dropped(node_id)
            self._node_dropped(node_id)
        for target in work.refresh:
            self.client.spawn(self.lookup_nodes(target))
        if work.republish:
            self.client.spawn(self._publish(work.republish))
        self.cache.expire(now)
        # Past the liveness window every node holding its records has dropped them too.
        window = self.node.config.liveness_window
        for node_id in [n for n, at in self._dead.items() if now - at > window]:
            del self._dead[node_id]

    async def _check_ready(self) -> None:
        if self.ready.is_set():
            return
        if len(self.node.table) == 0 and self.sources.configured and not self._alone:
            return
        self.ready.set()
        log.info(
            "discovery ready",
            peers=len(self.node.table),
            bootstrap=self.sources.configured,
            node_id=self.node_id.hex(),
        )
        if self._on_ready is not None:
            await self._on_ready()

    # -- bootstrap --------------------------------------------------------------------

    async def _join_loop(self) -> None:
        if not self.sources.configured:
            log.info("no bootstrap source configured: running as the first or only node")
            await self._check_ready()
            await self._await_callers()
            return
        attempt = 0
        while True:
            if len(self.node.table) > 0:
                attempt = 0
                await self._rejoin_round()
                await asyncio.sleep(self.tick)
                continue
            if self.counters.bootstrap_attempts > 0 and attempt == 0:
                log.info("routing table empty, bootstrapping again")
            joined, problem = await self._bootstrap_once()
            if joined:
                attempt = 0
                continue
            delay = backoff_delay(attempt, self._rng)
            # One warning per streak, then quiet: a node waiting for its first peer must not
            # flood the log.
            emit = log.warning if attempt == 0 and problem else log.debug
            emit(
                "bootstrap found no peer yet",
                problem=problem,
                attempt=attempt + 1,
                retry_in_s=round(delay, 1),
            )
            attempt += 1
            await asyncio.sleep(delay)

    async def _bootstrap_once(self) -> tuple[bool, str | None]:
        """One bootstrap attempt: returns (joined, problem)."""
        self.counters.bootstrap_attempts += 1
        gathered = await gather_endpoints(self.sources)
        self._bootstrap_endpoints = gathered.endpoints
        self._gathered_at = self._clock()
        answers = await asyncio.gather(*(self.client.ping_endpoint(e) for e in gathered.endpoints))
        for endpoint, answer in zip(gathered.endpoints, answers, strict=True):
            if answer is not None:
                self._rejoin.answered(
                    endpoint, answer.responder.node_id, self.node_id, self._gathered_at
                )
        failed = [e for e, a in zip(gathered.endpoints, answers, strict=True) if a is None]
        others = [a for a in answers if a is not None and a.responder.node_id != self.node_id]
        for answer in answers:
            if answer is not None and answer.observed_address and not self.address:
                self.address = answer.observed_address
                self._set_me()
                log.info("learned own address from a peer", address=self.address)
        if not others:
            problems = [*gathered.problems, *(f"{e}: no answer" for e in failed)]
            if not problems:
                # Every source answered and named only us (or nobody): we are the first node.
                self._alone = True
                await self._check_ready()
                return False, None
            return False, "; ".join(problems)
        await self._join(others[0].responder, gathered.endpoints)
        return len(self.node.table) > 0, None

    async def _join(self, via: Contact, endpoints: Sequence[BootstrapEndpoint]) -> None:
        """Kademlia join: look up our own ID, then refresh every farther bucket."""
        await self.lookup_nodes(self.node_id)
        now = self._clock()
        await asyncio.gather(*(self.lookup_nodes(t) for t in self.node.join_refresh(now)))
        # Keys advertised before we had peers are published now rather than on retry.
        self.node.advertised.retry(list(self.node.advertised), now)
        self._wake.set()
        log.info(
            "joined the network",
            via=str(via),
            bootstrap_endpoints=len(endpoints),
            peers=len(self.node.table),
        )
        await self._check_ready()

    async def _await_callers(self) -> None:
        """A node without bootstrap sources (the first node) learns peers only from their
        calls; each time its table fills again after emptying (it restarted, or lost every
        peer), it joins through them so its lookups and records reach the whole network."""
        had_peers = len(self.node.table) > 0
        while True:
            await asyncio.sleep(self.tick)
            has_peers = len(self.node.table) > 0
            if has_peers and not had_peers:
                via = next(iter(self.node.table))
                await self._join(via, [])
            had_peers = len(self.node.table) > 0

    async def _rejoin_round(self) -> None:
        """Pings configured bootstrap addresses missing from the routing table, each on its
        own backoff; one that answers is in the table now (heard_from), and a lookup of our
        own ID then tells both sides about the nodes near them."""
        now = self._clock()
        if self._gathered_at is None or now - self._gathered_at >= self._rejoin.recheck:
            self._gathered_at = now
            gathered = await gather_endpoints(self.sources)
            if gathered.problems:
                log.debug("bootstrap sources for rejoin", problems="; ".join(gathered.problems))
            # A source failing now keeps the addresses it gave before.
            if gathered.endpoints or not self._bootstrap_endpoints:
                self._bootstrap_endpoints = gathered.endpoints
        table_endpoints = {BootstrapEndpoint(c.address, c.discovery_port) for c in self.node.table}
        due = self._rejoin.due(self._bootstrap_endpoints, self.node.table, table_endpoints, now)
        if not due:
            return
        answers = await asyncio.gather(*(self.client.ping_endpoint(e) for e in due))
        now = self._clock()
        found: list[Contact] = []
        for endpoint, answer in zip(due, answers, strict=True):
            if answer is None:
                failures = self._rejoin.failed(endpoint, now)
                # One warning per silent streak of each address.
                emit = log.warning if failures == 1 else log.debug
                emit(
                    "bootstrap peer missing from the routing table does not answer",
                    endpoint=str(endpoint),
                    attempt=failures,
                )
                continue
            self._rejoin.answered(endpoint, answer.responder.node_id, self.node_id, now)
            if answer.responder.node_id in self.node.table:
                found.append(answer.responder)
        if found:
            log.info(
                "bootstrap peers back in the routing table",
                peers=[str(c) for c in found],
            )
            await self.lookup_nodes(self.node_id)
