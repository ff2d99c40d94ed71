"""One upstream fetch per digest (and per manifest reference) for the whole cluster.

On a local client's miss that no peer could serve, the registry asks here. The coordinator asks
discovery for the key's fetch lease:

- granted: it starts ONE upstream fetch task for the digest, spooled to disk as bytes arrive
  (see :mod:`spool`), advertises the digest so other nodes find this one, renews the lease while
  the fetch runs and releases it at the end. The task belongs to the node, not to the request:
  it keeps running while other nodes wait even when the client that started it goes away. An
  upstream body broken mid-way is resumed with a Range from the spooled offset.
- held by another node: the caller relays from that holder (the ordinary peer relay; the holder
  advertised the digest) and asks again while the relay finds nothing yet, so a holder that died
  or stalled, whose lease expired, is replaced by whoever asks next. A blob's holder serves at
  most ``inflight.max_waiters_per_fetch`` other nodes: past that the next asker is granted a
  lease of its own and fetches too, so a large rollout costs a few downloads, not one holder's
  uplink carrying every copy.
- no lease service, no room in the spool, the back-to-source limit or an upstream failure: the
  miss stays a miss (a fast 404, containerd pulls itself, as without peermirror).

Concurrent misses of one key on this node share one claim. Manifests go the same way, except
that the body is kept in memory for a short window (``inflight.manifest_window``) and never
longer: tags are mutable, so a tag's resolution is reused only within the window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.cancellation import cancel_and_wait
from services.common.config import InflightSection, NodeConfig
from services.common.logsetup import get_logger
from services.common.oci.document import digest_of
from services.registry.inflight.ports import (
    FetchLimiter,
    FetchSlot,
    Holder,
    KeyAdvertiser,
    LeaseClient,
    NoLimit,
    UpstreamBody,
    UpstreamFetcher,
    UpstreamManifest,
)
from services.registry.inflight.spool import Spool, SpoolPool
from services.registry.inflight.spool_feed import SpoolFeed
from services.registry.inflight.spool_state import SpoolPhase

# Bound on each call to discovery made on a request's behalf: it is node-local and quick, and a
# hung call must turn into a fast 404, not a hung pull.
DISCOVERY_CALL_S = 2.0

log = get_logger(__name__)

# Bytes of upstream body gathered into one spool write (and one wake-up of its readers).
WRITE_BATCH = 1024 * 1024
# A smaller batch is written once its first piece waited this long. Behind a slow upstream link
# every write wakes each reader, and each wake-up costs every node of the wave a piece to relay:
# at 200 Mbit/s, 5 ms made a write of about 125 KB and the registries spent about a third more
# CPU per GB than with 50 ms (bench.first_pull --upstream-mbit 200). 50 ms is still far below
# anything a pull would notice.
FLUSH_AFTER_S = 0.05

# KeyAdvertiser.advertise or KeyAdvertiser.withdraw.
_KeysCall = Callable[[Sequence[str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class InflightSettings:
    """The coordinator's timings: the ``inflight`` config section, and how often a waiter
    looks again for the blob or the lease."""

    section: InflightSection = field(default_factory=InflightSection)
    retry_interval_s: float = 0.2

    @classmethod
    def from_config(cls, section: InflightSection) -> InflightSettings:
        return cls(section)


@dataclass(frozen=True, slots=True)
class Fetching:
    """This node fetches the blob: serve it from `spool`."""

    spool: Spool


@dataclass(frozen=True, slots=True)
class HeldElsewhere:
    """Another node holds the lease: relay from `holder`."""

    holder: Holder


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Nobody will fetch it for this request: answer the miss (404) saying `reason`."""

    reason: str


BlobClaim = Fetching | HeldElsewhere | Unavailable
ManifestClaim = UpstreamManifest | HeldElsewhere | Unavailable


@dataclass
class Fetch:
    """One upstream fetch this node runs, as the status page shows it."""

    digest: str
    registry: str
    repository: str
    spool: Spool
    started_at: float = field(default_factory=time.time)
    # Requests served from this fetch other than the one that started it: local clients that
    # joined and peers' registries relaying from the spool.
    local_waiters: int = 0
    peer_waiters: int = 0
    resumes: int = 0
    lease_lost: bool = False
    task: asyncio.Task[None] | None = None


@dataclass
class InflightCounters:
    """Monotonic counts for /metrics."""

    fetches_started: int = 0
    fetches_completed: int = 0
    fetches_failed: int = 0
    # Requests that waited on a fetch someone else started, by where they came from.
    coalesced: dict[str, int] = field(
        default_factory=lambda: {"local": 0, "peer": 0, "remote_holder": 0}
    )
    fallbacks: int = 0
    upstream_manifest_requests: int = 0


class Coordinator:
    """The node's in-flight fetches, their spools, and the lease and upstream they use."""

    def __init__(
        self,
        settings: InflightSettings,
        pool: SpoolPool,
        lease: LeaseClient,
        upstream: UpstreamFetcher,
        advertiser: KeyAdvertiser,
        limiter: FetchLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.lease = lease
        self.upstream = upstream
        self.advertiser = advertiser
        self.limiter: FetchLimiter = limiter if limiter is not None else NoLimit()
        self.fetches: dict[str, Fetch] = {}
        self.counters = InflightCounters()
        self._blob_claims: dict[str, asyncio.Task[BlobClaim]] = {}
        self._manifest_claims: dict[str, asyncio.Task[ManifestClaim]] = {}
        self._window: dict[str, tuple[UpstreamManifest, float]] = {}
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(
        cls,
        cfg: NodeConfig,
        lease: LeaseClient,
        upstream: UpstreamFetcher,
        advertiser: KeyAdvertiser,
        limiter: FetchLimiter | None = None,
    ) -> Coordinator:
        """The coordinator `cfg.inflight` describes, over the given lease, upstream and
        discovery clients (the spool directory is created when the registry starts)."""
        section = cfg.inflight
        directory = section.spool_dir or cfg.node.data_dir / "spool"
        pool = SpoolPool(directory, section.max_spool_bytes, section.grace_period)
        return cls(
            InflightSettings.from_config(section), pool, lease, upstream, advertiser, limiter
        )

    # --- blobs -------------------------------------------------------------------------------

    async def claim_blob(self, registry: str, repository: str, digest: str) -> BlobClaim:
        """What a local client's miss of blob `digest` turns into (see the module docstring)."""
        fetch = self.fetches.get(digest)
        spool = self.pool.get(digest)
        if spool is not None:
            if fetch is not None:
                fetch.local_waiters += 1
            self.counters.coalesced["local"] += 1
            return Fetching(spool)
        claim = self._blob_claims.get(digest)
        if claim is not None:
            self.counters.coalesced["local"] += 1
        else:
            # A task of its own: a client going away while the lease is asked for must not
            # leave the lease granted with nobody fetching.
            claim = asyncio.create_task(
                self._claim_blob(registry, repository, digest), name=f"claim {digest}"
            )
            self._blob_claims[digest] = claim
            claim.add_done_callback(lambda _t: self._blob_claims.pop(digest, None))
        result = await asyncio.shield(claim)
        self._count(result)
        return result

    def _count(self, claim: BlobClaim | ManifestClaim) -> None:
        if isinstance(claim, HeldElsewhere):
            self.counters.coalesced["remote_holder"] += 1
        elif isinstance(claim, Unavailable):
            self.counters.fallbacks += 1

    async def peer_spool(self, digest: str, within: float) -> Spool | None:
        """The spool a peer's request for `digest` is served from, waiting at most `within`
        seconds for this node's claim on it when one is under way (None: not in flight).

        A waiter is told this node holds the lease as soon as it is granted, but the spool
        comes only once the upstream's headers gave the blob's size; a 404 in between would
        cost the waiter a retry round."""
        spool = self.pool.get(digest)
        if spool is None and await _claim_settled(self._blob_claims, digest, within):
            spool = self.pool.get(digest)
        if spool is None:
            return None
        fetch = self.fetches.get(digest)
        if fetch is not None:
            fetch.peer_waiters += 1
        self.counters.coalesced["peer"] += 1
        return spool

    async def _acquire(self, key: str, max_waiters: int = 0) -> HeldElsewhere | Unavailable | None:
        """None when the lease on `key` is ours, else who holds it (one serving at most
        `max_waiters` other nodes, 0: no bound) or why nobody does."""
        try:
            async with asyncio.timeout(DISCOVERY_CALL_S):
                answer = await self.lease.acquire(key, max_waiters)
        except Exception as exc:
            return Unavailable(f"fetch lease not available ({type(exc).__name__}: {exc})")
        if answer.granted:
            return None
        if answer.holder is None:
            return Unavailable("fetch lease refused without a holder")
        return HeldElsewhere(answer.holder)

    async def _lease_and_slot(
        self, key: str, max_waiters: int = 0
    ) -> FetchSlot | HeldElsewhere | Unavailable:
        """The lease on `key` and one of this node's upstream slots, both ours now; else who
        holds the lease or why this node may not fetch (the lease is not kept then)."""
        refused = await self._acquire(key, max_waiters)
        if refused is not None:
            return refused
        slot = await self.limiter.acquire()
        if slot is None:
            await self._release(key)
            return Unavailable("this node is at its back-to-source limit")
        return slot

    async def _claim_blob(self, registry: str, repository: str, digest: str) -> BlobClaim:
        # A holder's uplink carries a copy per waiter: past the bound, this node fetches too.
        slot = await self._lease_and_slot(digest, self.settings.section.max_waiters_per_fetch)
        if isinstance(slot, HeldElsewhere | Unavailable):
            return slot
        try:
            body = await self.upstream.fetch_blob(registry, repository, digest, 0)
        except Exception as exc:
            slot.release()
            await self._release(digest)
            log.info("upstream refused a blob", digest=digest, error=str(exc))
            return Unavailable(f"upstream: {type(exc).__name__}: {exc}")
        spool = self.pool.reserve(digest, body.size)
        if spool is None:
            await body.aclose()
            slot.release()
            await self._release(digest)
            return Unavailable(
                f"the spool has no room for {body.size} more bytes "
                f"({self.pool.used_bytes} of {self.pool.max_bytes} in use)"
            )
        fetch = Fetch(digest, registry, repository, spool)
        self.fetches[digest] = fetch
        self.counters.fetches_started += 1
        fetch.task = asyncio.create_task(self._run(fetch, body, slot), name=f"fetch {digest}")
        if self.settings.section.max_waiters_per_fetch == 0:
            # Before answering: any node relaying the digest finds us as a provider. With a
            # bound on waiters the lease alone names us (discovery names a told holder first),
            # so every waiter is one the lease counted.
            await self._call_discovery("advertise", self.advertiser.advertise, [digest])
        log.info("fetching from upstream for the cluster", digest=digest, size=body.size)
        return Fetching(spool)

    async def _run(self, fetch: Fetch, body: UpstreamBody, slot: FetchSlot) -> None:
        spool = fetch.spool
        renewer = asyncio.create_task(self._renew(fetch), name=f"renew {fetch.digest}")
        try:
            await self._pump(fetch, body)
            if spool.state.phase is SpoolPhase.GROWING:
                await spool.finish()
        except asyncio.CancelledError:
            await spool.fail("the registry is stopping")
            raise
        except Exception as exc:
            await spool.fail(f"{type(exc).__name__}: {exc}")
        finally:
            await cancel_and_wait([renewer], within=1.0, owner="inflight")
            slot.release()
            self.fetches.pop(fetch.digest, None)
            self.pool.settle(spool)
            self._finish_in_background(fetch)

    async def _pump(self, fetch: Fetch, body: UpstreamBody) -> None:
        """Copy upstream bytes into the spool, resuming a broken body with a Range."""
        spool = fetch.spool
        while True:
            try:
                await self._copy(body, spool)
                if spool.state.written >= spool.size:
                    return
                raise ConnectionError(
                    f"upstream body ended at {spool.state.written} of {spool.size} bytes"
                )
            except (ValueError, asyncio.CancelledError):
                raise
            except Exception as exc:
                if fetch.resumes >= self.settings.section.upstream_resumes:
                    raise
                fetch.resumes += 1
                log.info(
                    "upstream body broke; resuming with a Range",
                    digest=fetch.digest,
                    offset=spool.state.written,
                    error=str(exc),
                )
            finally:
                await body.aclose()
            body = await self.upstream.fetch_blob(
                fetch.registry, fetch.repository, fetch.digest, spool.state.written
            )
            if body.size != spool.size:
                await body.aclose()
                raise ValueError(f"upstream size changed from {spool.size} to {body.size}")

    async def _copy(self, body: UpstreamBody, spool: Spool) -> None:
        """Body bytes into the spool; TimeoutError when upstream sends nothing for the stall
        limit, so a stalled connection is replaced (or the fetch fails and its lease is
        released) instead of holding every waiter in the cluster."""
        loop = asyncio.get_running_loop()
        stall_s = self.settings.section.stall_timeout
        feed = SpoolFeed(spool, WRITE_BATCH, FLUSH_AFTER_S)
        stall = asyncio.timeout(stall_s)
        try:
            async with stall:
                async for piece in body.chunks():
                    await feed.add(piece)
                    # One timer, moved per piece (a task and a timer per piece cost more CPU
                    # than hashing the bytes).
                    stall.reschedule(loop.time() + stall_s)
        except Exception:
            # Bytes received before the body broke are kept: the resume starts after them.
            await feed.close()
            if stall.expired():
                raise TimeoutError(f"upstream sent nothing for {stall_s:g} s") from None
            raise
        except BaseException:
            await feed.abort()
            raise
        await feed.close()

    async def _renewed(self, key: str) -> bool:
        """Renew our lease on `key`: False once it is no longer ours (a failed call is not
        taken as a loss; the next renewal tries again)."""
        try:
            async with asyncio.timeout(DISCOVERY_CALL_S):
                return await self.lease.renew(key)
        except Exception as exc:
            log.info("lease renewal failed; will retry", key=key, error=str(exc))
            return True

    async def _renew(self, fetch: Fetch) -> None:
        while True:
            await asyncio.sleep(self.settings.section.renew_interval)
            if not await self._renewed(fetch.digest):
                # Our bytes are still good, so the fetch goes on; another node may fetch too.
                fetch.lease_lost = True
                log.warning("fetch lease lost while fetching", digest=fetch.digest)
                return

    def _finish_in_background(self, fetch: Fetch) -> None:
        failed = fetch.spool.state.phase is SpoolPhase.FAILED
        if failed:
            self.counters.fetches_failed += 1
        else:
            self.counters.fetches_completed += 1
        task = asyncio.create_task(self._after_fetch(fetch, failed), name="lease release")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _after_fetch(self, fetch: Fetch, failed: bool) -> None:
        if failed:
            await self._release(fetch.digest)
            # This node does not hold the blob after all; peers must not keep asking it.
            await self._call_discovery("withdraw", self.advertiser.withdraw, [fetch.digest])
            return
        # Kept while the complete spool is served: a node asking late is told this node holds
        # it (and discovery names the holder first) instead of being granted a second download
        # before this node's advertisement reaches it.
        while self.pool.get(fetch.digest) is fetch.spool and not fetch.lease_lost:
            await asyncio.sleep(self.settings.section.renew_interval)
            if not await self._renewed(fetch.digest):
                return
        await self._release(fetch.digest)

    async def _release(self, key: str) -> None:
        try:
            async with asyncio.timeout(DISCOVERY_CALL_S):
                await self.lease.release(key)
        except Exception as exc:
            # The lease expires by itself; a release only lets the next asker in sooner.
            log.info("lease release failed", key=key, error=str(exc))

    async def _call_discovery(self, what: str, call: _KeysCall, keys: list[str]) -> None:
        try:
            async with asyncio.timeout(DISCOVERY_CALL_S):
                await call(keys)
        except Exception as exc:
            log.warning(f"discovery {what} failed", keys=keys, error=str(exc))

    # --- manifests ---------------------------------------------------------------------------

    @property
    def window_size(self) -> int:
        """Keys (tags and digests) whose manifest is held for the window right now."""
        return len(self._window)

    def window_manifest(self, key: str) -> UpstreamManifest | None:
        """The manifest fetched for `key` (a tag's store key or a digest) within the window."""
        entry = self._window.get(key)
        if entry is None:
            return None
        manifest, until = entry
        if time.monotonic() >= until:
            del self._window[key]
            return None
        return manifest

    async def peer_manifest(self, key: str, within: float) -> UpstreamManifest | None:
        """The manifest a peer's request for `key` is answered with: the window's, or the one
        this node is claiming right now once that claim is settled (at most `within` seconds),
        for the reason :meth:`peer_spool` waits. None: nothing here for `key` (a claim that
        ended without a manifest included)."""
        manifest = self.window_manifest(key)
        if manifest is None and await _claim_settled(self._manifest_claims, key, within):
            manifest = self.window_manifest(key)
        if manifest is None:
            return None
        self.counters.coalesced["peer"] += 1
        return manifest

    async def claim_manifest(
        self, registry: str, repository: str, reference: str, key: str
    ) -> ManifestClaim:
        """What a local client's miss of manifest `reference` (store key `key` for a tag, the
        digest otherwise) turns into: the manifest, who fetches it, or why nobody does."""
        cached = self.window_manifest(key)
        if cached is not None:
            self.counters.coalesced["local"] += 1
            return cached
        claim = self._manifest_claims.get(key)
        if claim is not None:
            self.counters.coalesced["local"] += 1
        else:
            claim = asyncio.create_task(
                self._claim_manifest(registry, repository, reference, key), name=f"claim {key}"
            )
            self._manifest_claims[key] = claim
            claim.add_done_callback(lambda _t: self._manifest_claims.pop(key, None))
        result = await asyncio.shield(claim)
        self._count(result)
        return result

    async def _claim_manifest(
        self, registry: str, repository: str, reference: str, key: str
    ) -> ManifestClaim:
        slot = await self._lease_and_slot(key)
        if isinstance(slot, HeldElsewhere | Unavailable):
            return slot
        try:
            self.counters.upstream_manifest_requests += 1
            manifest = await self.upstream.fetch_manifest(registry, repository, reference)
        except Exception as exc:
            await self._release(key)
            return Unavailable(f"upstream: {type(exc).__name__}: {exc}")
        finally:
            slot.release()
        checked = _checked_manifest(manifest, reference)
        if checked is None:
            await self._release(key)
            return Unavailable(f"upstream manifest for {reference} does not match its digest")
        leased = [key]
        if key != checked.digest and await self._acquire(checked.digest) is None:
            # Before anyone learns the digest from this answer: a node that resolved the tag
            # through us and asks for the digest's lease next is sent here, not upstream again.
            leased.append(checked.digest)
        now = time.monotonic()
        keys = [key] if key == checked.digest else [key, checked.digest]
        self._window[key] = (checked, now + self.settings.section.manifest_window)
        # A manifest is content-addressed: once verified it is served by digest for the spools'
        # grace period (a tag only for the window), so a GET by digest that comes late still
        # costs one upstream request.
        kept = max(self.settings.section.manifest_window, self.settings.section.grace_period)
        self._window[checked.digest] = (checked, now + kept)
        await self._call_discovery("advertise", self.advertiser.advertise, keys)
        # The lease is kept for the window, so askers in it relay from here instead of
        # fetching again; then it is released and the next asker fetches afresh.
        loop = asyncio.get_running_loop()
        for leased_key in leased:
            loop.call_later(self.settings.section.manifest_window, self._end_window, leased_key)
        loop.call_later(kept, self._drop_stale)
        return checked

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for stale in [k for k, (_, until) in self._window.items() if until <= now]:
            del self._window[stale]

    def _end_window(self, key: str) -> None:
        self._drop_stale()
        task = asyncio.create_task(self._release(key), name=f"release {key}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- lifetime ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every fetch (their spools fail, so waiting readers are told) and drop spools."""
        tasks: list[asyncio.Future[Any]] = [f.task for f in self.fetches.values() if f.task]
        tasks += self._blob_claims.values()
        tasks += self._manifest_claims.values()
        await cancel_and_wait(tasks, within=2.0, owner="inflight")
        await cancel_and_wait(list(self._background), within=1.0, owner="inflight")
        self.pool.close()


async def _claim_settled(claims: Mapping[str, asyncio.Task[Any]], key: str, within: float) -> bool:
    """Wait at most `within` seconds for this node's claim on `key` to settle; whether one was
    under way (its outcome is the claimant's: a peer only looks at what it left behind)."""
    claim = claims.get(key)
    if claim is None:
        return False
    await asyncio.wait([claim], timeout=within)
    return True


def _checked_manifest(manifest: UpstreamManifest, reference: str) -> UpstreamManifest | None:
    """`manifest` with its digest computed from its bytes; None when a digest reference (or
    the upstream's own digest header) does not match them."""
    expected = reference if ":" in reference else manifest.digest
    algorithm = expected.partition(":")[0] if expected else "sha256"
    try:
        actual = digest_of(manifest.body, algorithm)
    except ValueError:
        return None
    if expected and actual != expected:
        return None
    return UpstreamManifest(actual, manifest.body, manifest.media_type)
