"""Reads a peer's blob body straight from the socket into a few reused buffers.

Read through aiohttp, every socket read becomes a fresh ``bytes`` object, parsed, queued and
joined into chunks: several copies and allocations per byte, which made a relay cost four
times the CPU of the bytes it moved. Once the peer's headers are in and checked, the relay
takes the connection over instead: the transport is handed a buffered protocol that receives
into pre-allocated 1 MiB buffers, and the relay gets whole chunks (memoryviews of them), gives
each back once it has been hashed and sent, and so never allocates per read. Reading pauses when
every buffer is taken (backpressure towards the peer). A taken-over connection is closed at the
end, never pooled again.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp

from services.registry.mirror.verify import PeerAnswerError

Chunk = bytes | memoryview
# One chunk is being filled, one hashed, one held back: one more lets the peer read ahead.
DEFAULT_BUFFERS = 4


def buffered_body(response: aiohttp.ClientResponse) -> bytes:
    """The body bytes aiohttp read along with `response`'s headers (the rest is still on the
    socket), for a relay about to read the socket itself."""
    try:
        return response.content.read_nowait(-1)
    except Exception as exc:  # the read already failed inside aiohttp
        raise PeerAnswerError(f"{type(exc).__name__}: {exc}") from exc


class PeerBody(asyncio.BufferedProtocol):
    """The rest of one answer's body, `length` bytes, in chunks of at most `chunk_bytes`."""

    def __init__(
        self, length: int, *, chunk_bytes: int, stall_timeout: float, buffers: int
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._remaining = length
        self._stall_timeout = stall_timeout
        size = max(1, min(chunk_bytes, length))
        self._free = [bytearray(size) for _ in range(max(2, buffers))]
        self._owned = {id(b) for b in self._free}
        self._current: memoryview | None = None
        self._filled = 0
        self._ready: collections.deque[Chunk] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._last_progress = self._loop.time()
        self.error: str | None = None

    @classmethod
    def take_over(
        cls,
        response: aiohttp.ClientResponse,
        length: int,
        *,
        chunk_bytes: int,
        stall_timeout: float,
        buffers: int = DEFAULT_BUFFERS,
    ) -> PeerBody:
        """The next `length` body bytes of `response` (headers read, body not yet): what aiohttp
        has already buffered first, then everything straight from its socket."""
        body = cls(length, chunk_bytes=chunk_bytes, stall_timeout=stall_timeout, buffers=buffers)
        early = buffered_body(response)
        if early:
            early = early[: body._remaining]
            body._remaining -= len(early)
            body._ready.append(early)
        connection = response.connection
        transport = connection.transport if connection is not None else None
        if body._remaining == 0 or transport is None or transport.is_closing():
            # Everything came with the headers, or the connection is already gone (then the
            # caller sees a short body).
            body._ended = True
            return body
        body._transport = transport
        body._next_buffer()
        transport.set_protocol(body)
        # aiohttp may have paused reading for its own buffer limit.
        transport.resume_reading()
        return body

    # --- the consumer side ----------------------------------------------------------------

    async def next_chunk(self) -> Chunk | None:
        """The next chunk, or None when the body is complete or the peer stopped sending (the
        caller compares what it got with what it expected). TimeoutError when the peer sends
        nothing for the stall timeout."""
        while not self._ready:
            if self._ended:
                return None
            await self._wait()
        return self._ready.popleft()

    def give_back(self, chunk: Chunk) -> None:
        """`chunk` (from this body) was consumed: its buffer may be filled again."""
        if not isinstance(chunk, memoryview) or id(chunk.obj) not in self._owned:
            return
        buffer = chunk.obj
        assert isinstance(buffer, bytearray)
        self._free.append(buffer)
        if self._paused and not self._ended and self._transport is not None:
            self._paused = False
            self._next_buffer()
            self._transport.resume_reading()

    def forget(self, chunk: Chunk) -> None:
        """`chunk` may still be referenced elsewhere (a transport's write queue): its buffer is
        not reused, a fresh one takes its place."""
        buffer = chunk.obj if isinstance(chunk, memoryview) else None
        if isinstance(buffer, bytearray) and id(buffer) in self._owned:
            self._owned.discard(id(buffer))
            fresh = bytearray(len(buffer))
            self._owned.add(id(fresh))
            self.give_back(memoryview(fresh))

    def close(self) -> None:
        """Stop reading and close the connection (it is never pooled again)."""
        self._ended = True
        if self._transport is not None:
            self._transport.close()
        self._wake()

    async def _wait(self) -> None:
        loop = self._loop
        while True:
            self._waiter = loop.create_future()
            try:
                async with asyncio.timeout_at(self._last_progress + self._stall_timeout):
                    await self._waiter
                return
            except TimeoutError:
                if loop.time() - self._last_progress >= self._stall_timeout:
                    raise TimeoutError(
                        f"peer sent no body bytes for {self._stall_timeout:g} s"
                    ) from None
            finally:
                self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the protocol side (called by the transport) -----------------------------------------

    def _next_buffer(self) -> None:
        if self._free:
            self._current = memoryview(self._free.pop())
            self._filled = 0
        else:
            self._current = None
            self._paused = True
            if self._transport is not None:
                self._transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        current = self._current
        if current is None or self._remaining <= 0:
            # Reading should be paused; anything still arriving is past the body's end.
            return memoryview(bytearray(64 * 1024))
        end = min(len(current), self._filled + self._remaining)
        return current[self._filled : end]

    def buffer_updated(self, nbytes: int) -> None:
        current = self._current
        if current is None or self._remaining <= 0:
            self.error = "peer sent more than the announced length"
            self._end()
            return
        self._filled += nbytes
        self._remaining -= nbytes
        self._last_progress = self._loop.time()
        if self._filled == len(current) or self._remaining == 0:
            self._ready.append(current[: self._filled])
            if self._remaining == 0:
                self._current = None
                self._end()
                return
            self._next_buffer()
            self._wake()

    def _flush_partial(self) -> None:
        if self._current is not None and self._filled:
            self._ready.append(self._current[: self._filled])
        self._current = None
        self._filled = 0

    def _end(self) -> None:
        self._ended = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._flush_partial()
        self._end()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
        self._flush_partial()
        self._ended = True
        self._wake()
