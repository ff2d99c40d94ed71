"""Asks the node's discovery service who holds a key, streaming providers as they are found.

A lookup runs in the background for the whole relay: the first provider is used the moment it
arrives, later ones are there for hedges and failovers. Discovery being down or slow is just "no
provider" (the relay answers 404 and containerd falls back), never an error of the request.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from services.common.cancellation import cancel_and_wait
from services.common.genproto.peermirror.discovery.v1 import local_pb2, local_pb2_grpc
from services.common.logsetup import get_logger
from services.common.request_id import outgoing_metadata
from services.registry.mirror.hedging import Peer, peer_from_contact

log = get_logger("registry.mirror.providers")

_CHANNEL_OPTIONS = [
    # Discovery is node-local: a proxy from the environment must never carry these calls.
    ("grpc.enable_http_proxy", 0),
    # A restarted discovery is found again within a second, not after minutes of backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ProviderLookup:
    """One FindProviders stream, read in the background into `found` (distinct, usable peers)."""

    def __init__(
        self, stub: local_pb2_grpc.LocalDiscoveryAsyncStub, key: str, limit: int, deadline: float
    ) -> None:
        self.key = key
        self.found: list[Peer] = []
        self.done = False
        self.error: str | None = None
        self._changed = asyncio.Event()
        self._started = asyncio.get_running_loop().time()
        # When the first provider arrived, or the lookup ended without one.
        self._resolved_at: float | None = None
        self._call = stub.FindProviders(
            local_pb2.FindProvidersRequest(key=key, limit=limit),
            timeout=deadline,
            # The request id lets discovery's log line be matched to the registry's.
            metadata=outgoing_metadata() or None,
        )
        self._limit = limit
        self._task = asyncio.create_task(self._read(), name=f"find-providers {key}")

    async def _read(self) -> None:
        try:
            async for response in self._call:
                contact = response.provider
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
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                self.error = f"discovery: {err.code().name}: {err.details()}"
                log.info("provider lookup failed", key=self.key, error=self.error)
        finally:
            self._call.cancel()
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
        self._call.cancel()
        # Bounded: a request must never wait on a lookup that ignores its cancel.
        await cancel_and_wait([self._task], within=1.0, owner="find-providers")


class DiscoveryClient:
    """The registry's channel to the LocalDiscovery API at `address`, opened on first use."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel: grpc.aio.Channel | None = None
        self._stub: local_pb2_grpc.LocalDiscoveryAsyncStub | None = None

    def _open(self) -> local_pb2_grpc.LocalDiscoveryAsyncStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
            self._stub = local_pb2_grpc.LocalDiscoveryStub(self._channel)
        return self._stub

    def find(self, key: str, *, limit: int, deadline: float) -> ProviderLookup:
        """Start looking `key` up: at most `limit` providers, for at most `deadline` seconds."""
        return ProviderLookup(self._open(), key, limit, deadline)

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
