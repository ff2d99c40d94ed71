"""Keeps the discovery service's set of advertised keys equal to what this node holds.

The tracker states what the node should advertise (`apply`, `replace`); one background task
pushes the difference to discovery's node-local API in batches. The pinner owns the node's
advertised set: whatever else discovery lists is withdrawn. Discovery being down or restarting
never stops the pinner: failed calls are retried with backoff, and after any failure — or when
discovery's identity or key count shows it lost state — the advertised set is listed again
(ListAdvertised) and the difference re-sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable

import grpc

from services.common.discovery_router import GrpcRouter
from services.common.logsetup import get_logger
from services.pinner.keys import KeyDelta, diff

# Keys per Advertise/Withdraw call: well under any sane server cap and gRPC's 4 MiB message
# limit (a tag reference is at most ~400 bytes).
BATCH_SIZE = 256
# Seconds between checks that discovery still holds what we believe it holds.
CHECK_INTERVAL_S = 2.0
CALL_TIMEOUT_S = 10.0
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0

log = get_logger(__name__)


def batches(keys: Iterable[str], size: int = BATCH_SIZE) -> list[list[str]]:
    """`keys` sorted and cut into lists of at most `size` (sorted: stable, readable logs)."""
    ordered = sorted(keys)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


class Advertiser:
    """Pushes the desired key set to LocalDiscovery at `address` (host:port or unix:/path)."""

    def __init__(
        self,
        address: str,
        *,
        batch_size: int = BATCH_SIZE,
        check_interval: float = CHECK_INTERVAL_S,
        max_message_bytes: int | None = None,
    ) -> None:
        self.address = address
        self._batch_size = batch_size
        self._check_interval = check_interval
        self._desired: set[str] = set()
        # What discovery holds as far as we know; None = unknown, list it before diffing.
        self._confirmed: set[str] | None = None
        self._server_started: tuple[int, int] | None = None
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._router = GrpcRouter(address, max_message_bytes, call_timeout=CALL_TIMEOUT_S)
        self._reachable = True
        self.pushes = 0

    # --- what the tracker calls -----------------------------------------------------------

    @property
    def desired(self) -> frozenset[str]:
        return frozenset(self._desired)

    def apply(self, delta: KeyDelta) -> None:
        """Fold a change of the node's key set into the desired set."""
        if not delta:
            return
        self._desired -= delta.removed
        self._desired |= delta.added
        self._wake()

    def replace(self, keys: Collection[str]) -> None:
        """Make `keys` the whole desired set."""
        self._desired = set(keys)
        self._wake()

    def _wake(self) -> None:
        self._idle.clear()
        self._changed.set()

    async def wait_idle(self) -> None:
        """Return once discovery holds the desired set (as far as this advertiser knows)."""
        await self._idle.wait()

    # --- the push loop ----------------------------------------------------------------------

    async def close(self) -> None:
        await self._router.close()

    async def run(self) -> None:
        """Push changes until cancelled; never raises on discovery failures."""
        backoff = BACKOFF_START_S
        try:
            while True:
                try:
                    await self._sync_once()
                    backoff = BACKOFF_START_S
                    if not self._reachable:
                        log.info("discovery reachable again", address=self.address)
                        self._reachable = True
                    await self._wait_for_work()
                except grpc.aio.AioRpcError as err:
                    self._confirmed = None
                    self._idle.clear()
                    if self._reachable:
                        log.warning(
                            "discovery unreachable; retrying",
                            address=self.address,
                            code=err.code().name,
                            detail=err.details(),
                        )
                        self._reachable = False
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            await self.close()

    async def _wait_for_work(self) -> None:
        try:
            async with asyncio.timeout(self._check_interval):
                await self._changed.wait()
        except TimeoutError:
            await self._check_server()

    async def _sync_once(self) -> None:
        self._changed.clear()
        if self._confirmed is None:
            self._confirmed = await self._router.list_advertised()
            await self._check_server(remember_only=True)
        delta = diff(self._desired, self._confirmed)
        # New content first: peers find it sooner; stale keys only cost a failed fetch.
        for batch in batches(delta.added, self._batch_size):
            await self._router.advertise(batch)
            self._confirmed.update(batch)
        for batch in batches(delta.removed, self._batch_size):
            await self._router.withdraw(batch)
            self._confirmed.difference_update(batch)
        if delta:
            self.pushes += 1
            log.info(
                "advertised set updated",
                advertised=len(delta.added),
                withdrawn=len(delta.removed),
                total=len(self._confirmed),
            )
        if not self._changed.is_set():
            self._idle.set()

    async def _check_server(self, *, remember_only: bool = False) -> None:
        """Detect a discovery that restarted (new start time) or lost keys (count differs)."""
        try:
            stats = await self._router.state()
        except grpc.aio.AioRpcError:
            if remember_only:
                return
            raise
        if stats is None:
            # No Stats: compare the listed set itself.
            if not remember_only:
                listed = await self._router.list_advertised()
                if listed != self._confirmed:
                    self._confirmed = listed
                    self._changed.set()
            return
        started = stats.started_at
        if remember_only:
            self._server_started = started
            return
        known = self._confirmed
        if started != self._server_started or known is None or stats.advertised_keys != len(known):
            log.info(
                "discovery state differs from ours; listing its keys again",
                restarted=started != self._server_started,
                theirs=stats.advertised_keys,
                ours=None if known is None else len(known),
            )
            self._confirmed = None
            self._changed.set()
