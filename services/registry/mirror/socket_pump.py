"""Moves a relayed blob body from the peer's socket to the client's in two worker threads.

Driven from the event loop, a relay paid for every socket read with a trip through asyncio
(readiness event, callbacks, a future per chunk): about 0.4 CPU-seconds per GB on top of the
hash, on the same thread that moves the bytes. When both connections are plain TCP the relay
instead lends both sockets to a pump thread: it reads the peer's socket into a few reused
1 MiB buffers and writes them to the client's socket with plain non-blocking syscalls, waiting
in poll(2) when a side is not ready, while a second thread feeds each buffer to the running
hash. Both let go of the GIL in those calls, so the work spreads over two cores and the event
loop stays free for other requests.

The rules of the relay still hold: every byte read is hashed in order (the hash thread is
drained before the pump returns, so a resume from another peer continues the same hash); only
the client's window of the body is written, and its final piece is read and hashed but not
written: the caller sends it only once the whole blob's digest is known (see relay.py).

The sockets stay registered with asyncio, which must neither read the peer's socket (the
caller pauses it) nor have bytes of its own queued for the client's (the caller waits for an
empty write buffer first). The pump works on duplicates of the descriptors and closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Protocol

# One buffer is being read into, one written out, two wait for the hash thread.
BUFFERS = 4
# How often a wait wakes to see whether the relay was cancelled.
STOP_POLL_S = 0.2
# Each pump holds two threads and four buffers; beyond this many at once relays stay on the
# event loop (slower, but bounded).
MAX_PUMPS = 16
_active_pumps = 0


class Hasher(Protocol):
    def update(self, data: bytes | memoryview) -> None: ...


class ClientWriteError(ConnectionError):
    """The client's socket refused the body (closed, reset, or stalled for too long)."""


class PumpStopped(Exception):
    """The relay was cancelled while the pump ran."""


@dataclass(frozen=True)
class PumpOutcome:
    """What one pump run moved."""

    received: int  # body bytes read from the peer, all of them hashed
    written: int  # bytes written to the client
    held: bytes  # the window's final piece: read and hashed, not written (empty if not reached)
    peer_error: str | None  # why the peer stopped short of `length` (None: it did not)


@dataclass(frozen=True)
class PumpJob:
    """One stretch of a body: `length` bytes from `peer_fd`, of which the bytes at offsets
    [`write_start`, `write_stop`) of the stretch go to `client_fd` (the client's window)."""

    peer_fd: int
    client_fd: int
    length: int
    write_start: int
    write_stop: int
    hasher: Hasher
    chunk_bytes: int
    peer_stall_s: float  # the peer may send nothing for this long before it is given up
    client_stall_s: float  # the client may accept nothing for this long before it is dropped


def run_pump(job: PumpJob, stop: threading.Event) -> PumpOutcome:
    """Run `job` on this (worker) thread. Raises ClientWriteError or PumpStopped; a peer that
    fails, stalls or closes early is reported in the outcome instead, after every byte it did
    send was hashed (and written, when in the window)."""
    with (
        socket.socket(fileno=os.dup(job.peer_fd)) as peer,
        socket.socket(fileno=os.dup(job.client_fd)) as client,
    ):
        hashing = _HashThread(job.hasher, job.chunk_bytes)
        try:
            return _Pump(job, stop, peer, client, hashing).run()
        finally:
            hashing.finish()


class _HashThread:
    """Hashes buffers in the order they are handed over; hands each back when done."""

    def __init__(self, hasher: Hasher, chunk_bytes: int) -> None:
        self._hasher = hasher
        self._todo: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self.free.put(bytearray(chunk_bytes))
        self._thread = threading.Thread(target=self._run, name="relay-hash", daemon=True)
        self._thread.start()

    def hash(self, view: memoryview) -> None:
        self._todo.put(view)

    def finish(self) -> None:
        """Return once every buffer handed over is hashed."""
        self._todo.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (view := self._todo.get()) is not None:
            self._hasher.update(view)
            buffer = view.obj
            assert isinstance(buffer, bytearray)
            self.free.put(buffer)


class _Pump:
    def __init__(
        self,
        job: PumpJob,
        stop: threading.Event,
        peer: socket.socket,
        client: socket.socket,
        hashing: _HashThread,
    ) -> None:
        self._job = job
        self._stop = stop
        self._peer = peer
        self._client = client
        self._hashing = hashing
        self.received = 0
        self.written = 0

    def run(self) -> PumpOutcome:
        job = self._job
        held = b""
        while self.received < job.length:
            buffer = self._take_buffer()
            filled, peer_error = self._fill(memoryview(buffer))
            start = self.received
            view = memoryview(buffer)[:filled]
            self.received += filled
            if filled:
                self._hashing.hash(view)
            low = min(max(job.write_start - start, 0), filled)
            high = min(max(job.write_stop - start, 0), filled)
            if high > low:
                if start + high == job.write_stop:
                    # The window's last piece: the caller sends it once the digest is known.
                    held = bytes(view[low:high])
                else:
                    self._write(view[low:high])
            if peer_error is not None:
                return PumpOutcome(self.received, self.written, held, peer_error)
        return PumpOutcome(self.received, self.written, held, None)

    def _take_buffer(self) -> bytearray:
        while True:
            try:
                # A buffer comes back only once hashed; it was written before the pump took
                # the next one, so it is free on both counts.
                return self._hashing.free.get(timeout=STOP_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    raise PumpStopped from None

    def _fill(self, buffer: memoryview) -> tuple[int, str | None]:
        """Read into `buffer` up to what the body still owes; returns the bytes read and why the
        peer stopped early, if it did."""
        want = min(len(buffer), self._job.length - self.received)
        filled = 0
        deadline = time.monotonic() + self._job.peer_stall_s
        while filled < want:
            try:
                n = self._peer.recv_into(buffer[filled:want])
            except (BlockingIOError, InterruptedError):
                if not self._wait(self._peer, select.POLLIN, deadline):
                    return filled, f"peer sent no body bytes for {self._job.peer_stall_s:g} s"
                continue
            except OSError as exc:
                return filled, f"{type(exc).__name__}: {exc}"
            if n == 0:
                return filled, f"body ended at byte {self.received + filled}"
            filled += n
            deadline = time.monotonic() + self._job.peer_stall_s
        return filled, None

    def _write(self, view: memoryview) -> None:
        done = 0
        deadline = time.monotonic() + self._job.client_stall_s
        while done < len(view):
            try:
                n = self._client.send(view[done:])
            except (BlockingIOError, InterruptedError):
                if not self._wait(self._client, select.POLLOUT, deadline):
                    raise ClientWriteError(
                        f"client took nothing for {self._job.client_stall_s:g} s"
                    ) from None
                continue
            except OSError as exc:
                raise ClientWriteError(f"{type(exc).__name__}: {exc}") from exc
            done += n
            self.written += n
            deadline = time.monotonic() + self._job.client_stall_s

    def _wait(self, sock: socket.socket, events: int, deadline: float) -> bool:
        """Wait until `sock` is ready for `events`; False once `deadline` passes. Wakes every
        STOP_POLL_S to honour a cancel. An error or hang-up counts as ready: the next call
        reports it."""
        poller = select.poll()
        poller.register(sock, events)
        while True:
            if self._stop.is_set():
                raise PumpStopped
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller.poll(min(left, STOP_POLL_S) * 1000):
                return True


# --- lending asyncio's sockets to the pump ------------------------------------------------------


class _Parked(asyncio.Protocol):
    """Stands in for the peer connection's protocol while a pump thread reads its socket."""


def plain_socket_fd(transport: asyncio.BaseTransport | None) -> int | None:
    """The descriptor of `transport`'s socket when it is an open plain-TCP transport (a TLS
    transport's socket carries records, not body bytes), else None."""
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None
    sock = transport.get_extra_info("socket")
    return None if sock is None else int(sock.fileno())


def can_pump() -> bool:
    return _active_pumps < MAX_PUMPS


def park(transport: asyncio.Transport) -> None:
    """Stop asyncio (and the HTTP client that owned it) from reading `transport`'s socket."""
    transport.set_protocol(_Parked())
    transport.pause_reading()


async def until_flushed(transport: asyncio.WriteTransport, within_s: float) -> None:
    """Wait until asyncio holds no unsent bytes for `transport` (the pump writes after them)."""
    async with asyncio.timeout(within_s):
        while transport.get_write_buffer_size():
            if transport.is_closing():
                raise ClientWriteError("client connection closing")
            await asyncio.sleep(0.002)


async def pump(job: PumpJob) -> PumpOutcome:
    """Run `job` on a thread of its own and wait for it. A cancel stops the thread and waits
    for it to let go of the sockets before passing the cancel on."""
    global _active_pumps
    loop = asyncio.get_running_loop()
    done: asyncio.Future[PumpOutcome] = loop.create_future()
    stop = threading.Event()

    def settle(result: PumpOutcome | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            assert result is not None
            done.set_result(result)

    def work() -> None:
        try:
            result = run_pump(job, stop)
        except BaseException as exc:  # handed to the waiting task, which raises it
            outcome: tuple[PumpOutcome | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    _active_pumps += 1
    try:
        threading.Thread(target=work, name="relay-pump", daemon=True).start()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait([done], timeout=STOP_POLL_S * 10)
                done.exception()  # retrieved: the cancel is what goes on
            raise
    finally:
        _active_pumps -= 1
