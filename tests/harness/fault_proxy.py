"""An HTTP/1.1 proxy on a loopback port that injects faults between a client and a registry.

One request per connection (the proxy asks the upstream to close after each response and tells
the client the same), so every fault applies to a whole exchange. Faults, set on `faults` at any
time: delay the response headers, truncate the body after N bytes, flip the byte at offset N,
replace Docker-Content-Digest or Content-Type, close each connection at once (refuse), never
answer (hang), drip the body one byte at a time after N bytes, or send it at a capped rate.
Everything seen is recorded for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

_HEAD_END = b"\r\n\r\n"
_CHUNK = 64 * 1024
_DIGEST_HEADER = b"docker-content-digest"


@dataclass
class Faults:
    """What the proxy does to the next exchanges (None / 0 / False: nothing)."""

    header_delay: float = 0.0
    truncate_at: int | None = None
    corrupt_at: int | None = None
    digest_header: str | None = None
    content_type: str | None = None
    refuse: bool = False
    hang: bool = False
    # After this many body bytes, one byte per `drip_interval` seconds.
    drip_after: int | None = None
    drip_interval: float = 0.3
    # Body bytes per second (a congested link); None: as fast as the upstream sends.
    rate: float | None = None


@dataclass
class SeenRequest:
    """A request the proxy received: method, target and headers (names lower-cased)."""

    method: str
    target: str
    headers: dict[str, str] = field(default_factory=dict)


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        fields.append((name.strip(), value.strip()))
    return lines[0], fields


def _build_head(first: str, fields: list[tuple[str, str]]) -> bytes:
    lines = [first, *(f"{n}: {v}" for n, v in fields if n.lower() != "connection")]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FaultProxy:
    """`async with FaultProxy(upstream_port) as p:` listens on 127.0.0.1:`p.port`."""

    def __init__(self, upstream_port: int, faults: Faults | None = None) -> None:
        self.upstream_port = upstream_port
        self.faults = faults if faults is not None else Faults()
        self.requests: list[SeenRequest] = []
        self.connections = 0
        self.completed = 0
        self.abandoned = 0
        self.body_bytes = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def contact(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(BaseException):
                await task
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            faults = self.faults
            if faults.refuse:
                writer.transport.abort()
                return
            head = await reader.readuntil(_HEAD_END)
            first, fields = _parse_head(head)
            method, _, rest = first.partition(" ")
            target = rest.rpartition(" ")[0]
            self.requests.append(SeenRequest(method, target, {n.lower(): v for n, v in fields}))
            if faults.hang:
                await reader.read()  # until the client gives up
                self.abandoned += 1
                return
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            upstream.write(_build_head(first, fields))
            await upstream.drain()
            status_line, resp_fields = _parse_head(await up_reader.readuntil(_HEAD_END))
            if faults.digest_header is not None:
                resp_fields = [
                    (n, faults.digest_header if n.lower().encode() == _DIGEST_HEADER else v)
                    for n, v in resp_fields
                ]
            if faults.content_type is not None:
                resp_fields = [
                    (n, faults.content_type if n.lower() == "content-type" else v)
                    for n, v in resp_fields
                ]
            if faults.header_delay and not await self._client_stays(reader, faults.header_delay):
                self.abandoned += 1
                return
            writer.write(_build_head(status_line, resp_fields))
            await writer.drain()
            await self._relay_body(up_reader, writer, faults, bodyless=method == "HEAD")
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.abandoned += 1
        finally:
            if upstream is not None:
                upstream.close()
            with contextlib.suppress(Exception):
                writer.close()
            self._handlers.discard(task)

    async def _client_stays(self, reader: asyncio.StreamReader, delay: float) -> bool:
        """Wait `delay` seconds; False as soon as the client closes its connection."""
        eof = asyncio.ensure_future(reader.read(1))
        try:
            done, _ = await asyncio.wait({eof}, timeout=delay)
            return not done
        finally:
            eof.cancel()

    async def _relay_body(
        self,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        faults: Faults,
        *,
        bodyless: bool,
    ) -> None:
        offset = 0
        while not bodyless:
            chunk = await up_reader.read(_CHUNK)
            if not chunk:
                break
            if faults.corrupt_at is not None and offset <= faults.corrupt_at < offset + len(chunk):
                i = faults.corrupt_at - offset
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
            if faults.truncate_at is not None and offset + len(chunk) >= faults.truncate_at:
                writer.write(chunk[: faults.truncate_at - offset])
                self.body_bytes += faults.truncate_at - offset
                await writer.drain()
                return
            await self._send(writer, chunk, offset, faults)
            offset += len(chunk)
            self.body_bytes += len(chunk)
        self.completed += 1

    async def _send(
        self, writer: asyncio.StreamWriter, chunk: bytes, offset: int, faults: Faults
    ) -> None:
        """Send `chunk` (at body `offset`) as fast as the drip and rate faults allow."""
        if faults.drip_after is not None and offset + len(chunk) > faults.drip_after:
            fast = max(0, faults.drip_after - offset)
            writer.write(chunk[:fast])
            await writer.drain()
            for i in range(fast, len(chunk)):
                # Fault pacing: the drip's interval is the fault being injected.
                await asyncio.sleep(faults.drip_interval)
                writer.write(chunk[i : i + 1])
                await writer.drain()
            return
        if faults.rate is not None:
            step = max(1, int(faults.rate / 50))  # 50 sends per second
            for i in range(0, len(chunk), step):
                writer.write(chunk[i : i + step])
                await writer.drain()
                # Fault pacing: holding the rate down is the fault being injected.
                await asyncio.sleep(step / faults.rate)
            return
        writer.write(chunk)
        await writer.drain()
