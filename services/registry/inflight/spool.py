"""Growing on-disk spools of blobs being fetched from upstream, readable while they grow.

One file per digest under the spool directory, written as upstream bytes arrive. Any number of
readers read any range of it: a reader ahead of the writer waits for bytes instead of failing.
The running hash is checked when the last byte is in; until then the blob's last byte is held
back from every reader (see :mod:`spool_state`), and a mismatch fails the spool, which aborts
every reader: a wrong body is never completed. Spools count against one byte bound: a blob that
does not fit is not spooled (the caller answers 404 and containerd fetches it itself). A spool
is deleted a grace period after it completed (containerd has committed the blob by then, and the
ordinary local path serves it) or at once when it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from services.common.logsetup import get_logger
from services.registry.inflight.spool_state import SpoolFailedError, SpoolPhase, SpoolState

# Most bytes a reader takes per read (and so per chunk it hands to a socket).
READ_CHUNK = 1024 * 1024
# Chunks at least this large are hashed in a worker thread (hashlib releases the GIL).
THREAD_HASH_BYTES = 64 * 1024
# Buffers one pwritev takes at most (Linux's IOV_MAX is 1024).
_MAX_IOV = 512
_SPOOL_NAME = re.compile(r"^[a-z0-9]+-[a-f0-9]{32,128}\.spool$")

log = get_logger(__name__)


class SpoolStalledError(SpoolFailedError):
    """A reader waited longer than its stall limit for the next bytes."""


def spool_file_name(digest: str) -> str:
    """``sha256-<hex>.spool``: the digest, spelt so that it is a plain file name."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}-{encoded}.spool"


class Spool:
    """One blob's spool: a file, its state, the running hash and the readers' wake-ups."""

    def __init__(self, path: Path, digest: str, size: int) -> None:
        algorithm, _, self._expected = digest.partition(":")
        self.path = path
        self.state = SpoolState(digest, size)
        self._hash = hashlib.new(algorithm)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._progress = asyncio.Condition()
        self.readers = 0
        self.started_at = time.time()
        # Set once the pool dropped the spool: the file is gone, the descriptor closes when
        # the last reader leaves.
        self._retired = False

    @property
    def digest(self) -> str:
        return self.state.digest

    @property
    def size(self) -> int:
        return self.state.size

    # --- the one writer ----------------------------------------------------------------------

    async def write(self, chunk: bytes) -> None:
        """Append `chunk` (the next upstream bytes); raises ValueError past the blob's size."""
        await self.write_parts([chunk])

    async def write_parts(self, parts: Sequence[bytes]) -> None:
        """Append `parts` in order with one vectored write: upstream's pieces as they came,
        never joined (a join copied every byte once more). ValueError past the blob's size."""
        length = sum(len(part) for part in parts)
        if not length:
            return
        self.state.check_room(length)
        offset = self.state.written
        if length >= THREAD_HASH_BYTES:
            await asyncio.to_thread(self._append, parts, offset)
        else:
            self._append(parts, offset)
        # Counted only once on disk: readers pread up to `written`.
        self.state.accept(length)
        await self._notify()

    def _append(self, parts: Sequence[bytes], offset: int) -> None:
        views = [memoryview(part) for part in parts if part]
        while views:
            n = os.pwritev(self._fd, views[:_MAX_IOV], offset)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                self._hash.update(views.pop(0))
            if n:
                self._hash.update(views[0][:n])
                views[0] = views[0][n:]

    async def finish(self) -> bool:
        """The writer is done: complete when every byte is in and hashes to the digest,
        failed otherwise. Returns whether the spool completed."""
        state = self.state
        if state.written != state.size:
            state.fail(f"upstream ended after {state.written} of {state.size} bytes")
        elif self._hash.hexdigest() != self._expected:
            state.fail("upstream bytes do not match the digest")
        else:
            state.complete()
        await self._notify()
        if state.phase is SpoolPhase.FAILED:
            log.warning("spool failed", digest=self.digest, reason=state.error)
        return state.phase is SpoolPhase.COMPLETE

    async def fail(self, reason: str) -> None:
        """Give up on this spool: every reader's stream is aborted with `reason`."""
        self.state.fail(reason)
        await self._notify()

    async def _notify(self) -> None:
        async with self._progress:
            self._progress.notify_all()

    # --- readers -----------------------------------------------------------------------------

    async def read(self, offset: int, count: int, stall_s: float) -> AsyncIterator[bytes]:
        """`count` bytes from `offset`, waiting for bytes not written yet (at most `stall_s`
        seconds without progress). Raises SpoolFailedError when the spool fails meanwhile."""
        if offset < 0 or count < 0 or offset + count > self.size:
            raise ValueError(f"range {offset}+{count} outside a {self.size}-byte blob")
        self.readers += 1
        try:
            position, end = offset, offset + count
            while position < end:
                await self._wait_for(position, stall_s)
                take = min(end - position, self.state.available(position), READ_CHUNK)
                data = await asyncio.to_thread(os.pread, self._fd, take, position)
                if len(data) != take:
                    raise SpoolFailedError(f"spool of {self.digest} was truncated")
                position += take
                yield data
        finally:
            self.readers -= 1
            self._close_if_unused()

    async def readable(self, position: int, stall_s: float) -> int:
        """Bytes readable at `position` (> 0), waiting for them as :meth:`read` does."""
        await self._wait_for(position, stall_s)
        return self.state.available(position)

    async def _wait_for(self, position: int, stall_s: float) -> None:
        state = self.state
        state.check()
        if state.available(position) > 0:
            return
        try:
            async with asyncio.timeout(stall_s), self._progress:
                await self._progress.wait_for(
                    lambda: state.available(position) > 0 or state.phase is SpoolPhase.FAILED
                )
        except TimeoutError:
            raise SpoolStalledError(
                f"no new bytes of {self.digest} for {stall_s:g} s (at {state.written} of "
                f"{state.size})"
            ) from None
        state.check()

    async def verdict(self, stall_s: float) -> None:
        """Wait until the spool is verified; raises SpoolFailedError when it is not. A reader
        of a range short of the blob's end calls this before ending its answer."""
        state = self.state
        try:
            async with asyncio.timeout(stall_s), self._progress:
                await self._progress.wait_for(lambda: state.done)
        except TimeoutError:
            raise SpoolStalledError(f"{self.digest} not verified within {stall_s:g} s") from None
        state.check()

    # --- lifetime ----------------------------------------------------------------------------

    def retire(self) -> None:
        """Delete the file now; the descriptor lives until the last reader is done."""
        self._retired = True
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self._retired and self.readers == 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SpoolPool:
    """The spool directory: at most `max_bytes` of spools, each removed after its grace."""

    def __init__(self, directory: Path, max_bytes: int, grace_s: float) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self._spools: dict[str, Spool] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def open(self) -> None:
        """Create the directory and delete spools a previous run left (never complete)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in self.directory.iterdir():
            if _SPOOL_NAME.match(entry.name) and entry.name not in self._names():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    def _names(self) -> set[str]:
        return {s.path.name for s in self._spools.values()}

    @property
    def used_bytes(self) -> int:
        """Bytes the live spools take (their whole blobs, reserved when they start)."""
        return sum(s.size for s in self._spools.values())

    def spools(self) -> list[Spool]:
        return list(self._spools.values())

    def get(self, digest: str) -> Spool | None:
        """The live spool of `digest` (growing or complete, never failed)."""
        spool = self._spools.get(digest)
        if spool is not None and spool.state.phase is SpoolPhase.FAILED:
            return None
        return spool

    def fits(self, size: int) -> bool:
        """Whether a `size`-byte blob can be spooled now."""
        return self.used_bytes + size <= self.max_bytes

    def reserve(self, digest: str, size: int) -> Spool | None:
        """A new spool for `digest`, or None when it would pass the bound."""
        if digest in self._spools:
            self.remove(digest)
        if not self.fits(size):
            return None
        spool = Spool(self.directory / spool_file_name(digest), digest, size)
        self._spools[digest] = spool
        return spool

    def settle(self, spool: Spool) -> None:
        """The spool's writer finished: a failed spool goes now, a complete one after the
        grace period."""
        if spool.state.phase is SpoolPhase.FAILED:
            self._drop(spool)
            return
        loop = asyncio.get_running_loop()
        self._timers[spool.digest] = loop.call_later(self.grace_s, self._drop, spool)

    def _drop(self, spool: Spool) -> None:
        if self._spools.get(spool.digest) is spool:
            del self._spools[spool.digest]
            timer = self._timers.pop(spool.digest, None)
            if timer is not None:
                timer.cancel()
        spool.retire()

    def remove(self, digest: str) -> None:
        """Drop the spool of `digest` now, if any."""
        spool = self._spools.get(digest)
        if spool is not None:
            self._drop(spool)

    def close(self) -> None:
        """Drop every spool (the service is stopping)."""
        for spool in list(self._spools.values()):
            self._drop(spool)
