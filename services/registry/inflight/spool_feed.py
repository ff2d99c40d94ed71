"""Upstream pieces gathered into spool writes: few large writes, and no byte waits for long.

Upstream pieces are small (a socket read each). Each spool write is a thread hop and wakes
every reader of the spool, each of which then sends what became readable (a ``sendfile`` per
reader), so writing piece by piece costs far more CPU than the bytes' hashing. A feed gathers
the pieces while one write runs and writes them together once ``batch`` bytes are in, or
``flush_s`` after the first of them arrived when upstream is slower, unjoined (one vectored
write; see :meth:`Spool.write_parts`).
"""

from __future__ import annotations

import asyncio
import contextlib

from services.common.cancellation import cancel_and_wait
from services.registry.inflight.spool import Spool


class SpoolFeed:
    """Pieces on their way into `spool`: :meth:`add` them in order, then :meth:`close` (which
    writes what is left) or :meth:`abort`. A write that fails (more bytes than the blob's
    size) is raised by the next :meth:`add` or by :meth:`close`."""

    def __init__(self, spool: Spool, batch: int, flush_s: float) -> None:
        self._spool = spool
        self._batch = batch
        self._flush_s = flush_s
        self._parts: list[bytes] = []
        self._gathered = 0
        self._first_at = 0.0  # when the oldest piece not taken yet arrived (loop time)
        self._closed = False
        # Set when the writer has something to decide: a first piece, a full batch, the end.
        self._wake = asyncio.Event()
        # Set when the writer took the gathered pieces (or stopped): room for more.
        self._taken = asyncio.Event()
        self._writer = asyncio.create_task(self._write_all(), name="spool feed")

    async def add(self, piece: bytes) -> None:
        """Queue `piece`; waits while two batches are already waiting (bounded memory: the
        upstream connection is paused meanwhile)."""
        if self._writer.done():
            self._writer.result()  # its error, or RuntimeError below
            raise RuntimeError("spool feed already closed")
        self._parts.append(piece)
        self._gathered += len(piece)
        if len(self._parts) == 1:
            self._first_at = asyncio.get_running_loop().time()
            self._wake.set()
        elif self._gathered >= self._batch:
            self._wake.set()
        while self._gathered >= 2 * self._batch and not self._writer.done():
            self._taken.clear()
            await self._taken.wait()

    async def close(self) -> None:
        """Write every piece added and wait for it; raises the write's error if one failed."""
        self._closed = True
        self._wake.set()
        await self._writer

    async def abort(self) -> None:
        """Stop writing (pieces not written yet are dropped)."""
        await cancel_and_wait([self._writer], within=1.0, owner="inflight")

    async def _write_all(self) -> None:
        try:
            while True:
                while not self._parts and not self._closed:
                    self._wake.clear()
                    await self._wake.wait()
                if not self._parts:
                    return
                # One timer per batch, not per piece.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(self._first_at + self._flush_s):
                        while self._gathered < self._batch and not self._closed:
                            self._wake.clear()
                            await self._wake.wait()
                parts, self._parts, self._gathered = self._parts, [], 0
                self._taken.set()
                await self._spool.write_parts(parts)
        finally:
            self._taken.set()
