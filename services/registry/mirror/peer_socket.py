"""One blob request to a peer on a blocking socket (TLS or plain), driven from a worker thread.

The relay's data path, the same for plain TCP and TLS: a worker thread connects, sends the
request, reads the response head and then the body with blocking calls. ``ssl`` and ``hashlib``
let go of the GIL while they decrypt and hash, so a relay's receive, TLS decryption and SHA-256
run on another core than the event loop, which only sends what the thread hands it (and
supervises: it cancels a request by shutting its socket down, which wakes a blocked call).
Nothing here touches asyncio's transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

from multidict import CIMultiDict

from services.common.hostport import join_host_port
from services.registry.mirror.verify import PeerAnswerError

# A response head larger than this is not a registry's.
MAX_HEAD_BYTES = 64 * 1024
# Bytes gathered per hand-over to the event loop at most; a read never waits for more than
# what has already arrived, so bytes reach the client as they come.
GATHER_BYTES = 1024 * 1024
RECV_BYTES = 256 * 1024
# A read that filled less than this share of its buffer is copied out of it (see read()).
SMALL_PIECE_SHARE = 4
# The smallest receive buffer (two TLS records): see read() for how it is sized.
MIN_PIECE = 32 * 1024
# Kernel buffers for fast links (the kernel caps them at its own maximum).
SOCKET_BUFFER = 4 * 1024 * 1024
# How long a cancelled worker may take to let go of its socket.
CANCEL_WAIT_S = 2.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Head:
    """A response's status, headers (case-insensitive) and the body bytes read with them."""

    status: int
    headers: CIMultiDict[str]
    early: bytes


class BufferPool:
    """Receive buffers of `size` bytes, reused once nothing refers to them any more.

    A new buffer is zeroed and its pages faulted in while the GIL is held: in a wave of first
    pulls that was a fifth of a relaying registry's GIL time. The reader takes buffers (any
    thread), the sender gives each back once it sent the bytes (see :meth:`give_back`).
    """

    def __init__(self, size: int, keep: int = 4) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        # Whether a buffer ever came back: until then, a small read gets a small buffer.
        self._reused = False

    def take(self, length: int) -> memoryview:
        """A view of `length` bytes (at most `size`) of a free or new buffer."""
        try:
            buffer = self._free.pop()  # atomic: the sender may give back meanwhile
        except IndexError:
            buffer = bytearray(self.size if self._reused or length >= self.size else length)
        return memoryview(buffer)[: min(length, len(buffer))]

    def give_back(self, buffer: object) -> None:
        """Keep `buffer` for a later read when it is one of ours and nothing refers to it."""
        if (
            isinstance(buffer, bytearray)
            and len(buffer) == self.size
            and len(self._free) < self._keep
            and not _exported(buffer)
        ):
            self._reused = True
            self._free.append(buffer)


def _exported(buffer: bytearray) -> bool:
    """Whether a view of `buffer` still exists (the client's transport may hold one, or the
    relay a held-back piece): Python refuses to resize a bytearray while one does, so an
    attempt to tells, and a buffer still referred to is never written again."""
    try:
        buffer.append(0)
    except BufferError:
        return True
    del buffer[-1]
    return False


class PeerSocket:
    """One HTTP/1.1 exchange with a peer: :meth:`request`, then :meth:`read` until the body's
    Content-Length is in (or ``b""``, the peer closed), then :meth:`close`. :meth:`cancel` may
    be called from any thread.

    The peer is not asked to close after its answer (``Connection: close``): the relay knows
    where the body ends, and a peer closing right after an answer is what once lost its last
    TLS records (see services/registry/http_protocols.TlsHttpProtocol). Closing is ours, once every
    byte is in."""

    def __init__(self, address: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.address = address
        self.port = port
        self._ssl_context = ssl_context
        self._sock: socket.socket | None = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._piece = MIN_PIECE  # the next read's buffer size (see read())
        self.buffers = BufferPool(GATHER_BYTES)

    def request(self, target: str, headers: Mapping[str, str], timeout: float) -> Head:
        """Connect, send ``GET target`` and read the response head (each step within
        `timeout` seconds). Raises OSError (TimeoutError included) or PeerAnswerError."""
        raw = socket.create_connection((self.address, self.port), timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock = (
                raw
                if self._ssl_context is None
                else self._ssl_context.wrap_socket(raw, server_hostname=self.address)
            )
        except BaseException:
            raw.close()
            raise
        with self._lock:
            if self._cancelled.is_set():
                # Cancelled (or closed) while connecting: nobody will close this one but us.
                sock.close()
                raise ConnectionAbortedError("request cancelled")
            self._sock = sock
        lines = [f"GET {target} HTTP/1.1", f"Host: {join_host_port(self.address, self.port)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return self._read_head(sock)

    def _read_head(self, sock: socket.socket) -> Head:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD_BYTES:
                raise PeerAnswerError("response head too large")
            data = sock.recv(RECV_BYTES)
            if not data:
                raise PeerAnswerError("connection closed before the response head")
            buffer += data
        head, _, early = buffer.partition(b"\r\n\r\n")
        status_line, *fields = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise PeerAnswerError(f"malformed status line {status_line[:80]!r}")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in fields:
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise PeerAnswerError("malformed response header")
            headers.add(name.strip(), value.strip())
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            raise PeerAnswerError("chunked blob answer (a registry sends Content-Length)")
        return Head(int(parts[1]), headers, early)

    def read(self, limit: int, timeout: float) -> bytes | memoryview:
        """Up to `limit` body bytes: waits at most `timeout` seconds for the first, then takes
        only what has already arrived. ``b""`` at the end of the stream; TimeoutError when
        nothing came in time; other OSErrors for a broken connection."""
        sock = self._sock
        if sock is None or self._cancelled.is_set():
            raise ConnectionAbortedError("request cancelled")
        # Received straight into one buffer per piece: gathering recv() results and joining
        # them copied every byte once more (about 0.15 CPU-s per GB on this machine). A buffer
        # is reused only once nothing refers to it (see BufferPool), so the view can be handed
        # on and held. A new buffer is zeroed, so it is sized at twice the last read (doubling
        # while reads fill it): a reader that outpaces its peer gets a record per read and
        # must not clear 1 MiB each.
        buffer = self.buffers.take(max(min(limit, self._piece), 1))
        sock.settimeout(max(timeout, 0.001))
        size = sock.recv_into(buffer)
        if not size:
            return b""
        # Then whatever else has arrived, without waiting (over TLS a read yields one record
        # of at most 16 KiB; asking the socket beats a poll per record).
        sock.settimeout(0.0)
        while size < len(buffer):
            try:
                got = sock.recv_into(buffer[size:])
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            if not got:
                break  # the end shows on the next read
            size += got
        self._piece = min(max(2 * size, MIN_PIECE), GATHER_BYTES)
        if size * SMALL_PIECE_SHARE < len(buffer):
            # A trickle: keep its bytes, not the whole buffer, while it waits to be sent.
            data = bytes(buffer[:size])
            base = buffer.obj
            buffer.release()
            self.buffers.give_back(base)
            return data
        return buffer[:size]

    def cancel(self) -> None:
        """Stop the exchange: a blocked call in the worker returns with an error."""
        with self._lock:
            self._cancelled.set()
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Cancel and let go of the socket (from any thread; a blocked call is woken first)."""
        with self._lock:
            self._cancelled.set()
            self._shutdown()
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


async def in_thread(
    work: Callable[[], T], cancel: Callable[[], None], *, name: str, wait: bool = True
) -> T:
    """Run `work` on a thread of its own and wait for it. On a cancel, `cancel` is called (it
    must make `work` return soon) and, with `wait`, the thread is waited for, bounded, before
    the cancel goes on (without: `work` must clean up after itself; a connect cannot be woken,
    and a lost hedge must not hold up the winner). A dedicated thread, not the default pool: a
    slow peer must not hold a pool worker that hashing and file reads of other requests need."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(cast("T", result))

    def run() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (work(), None)
        except BaseException as exc:  # handed to the waiting task, which raises it
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        cancel()
        if wait:
            with contextlib.suppress(BaseException):
                await asyncio.wait([done], timeout=CANCEL_WAIT_S)
        # Whatever the thread ends with is not wanted now (and must not be logged as lost).
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
