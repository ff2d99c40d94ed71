"""The registry's HTTP edge over real HTTP: every request, whichever part of Sanic or of ours
answers it, gets its request id back, exactly one `request` log line carrying that id, and an
error answer that is an OCI error body with a 4xx status and no traceback."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from services.common.logsetup import configure_logging
from services.common.store.memory import MemoryStore
from services.common.store.protocol import Descriptor, StoreUnavailableError
from services.registry.stats import RequestKind, Result
from tests.harness.registry_inproc import RunningRegistry, serve_registry
from tests.harness.wait import wait_until

IMAGE = "docker.io/library/app:1.0"
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'


class BrokenStore(MemoryStore):
    """Fault injection: resolving one tag fails with an error the store contract does not name
    (a bug somewhere below the handler), and reading a blob marked `failing` fails after its
    first chunk (the disk went away mid-body)."""

    failing: set[str]

    async def resolve(self, reference: str) -> Descriptor:
        if reference.endswith(":broken"):
            raise RuntimeError("bug below the handler")
        return await super().resolve(reference)

    async def read(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        chunks = 0
        async for chunk in super().read(digest, offset, length):
            if chunks and digest in getattr(self, "failing", ()):
                raise StoreUnavailableError("disk gone mid-body")
            chunks += 1
            yield chunk


@dataclass
class Edge:
    registry: RunningRegistry
    session: aiohttp.ClientSession
    log: io.StringIO

    async def ask(
        self, method: str, target: str, request_id: str, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        async with self.session.request(
            method, self.registry.url + target, headers={"X-Request-Id": request_id, **headers}
        ) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()

    def request_lines(self, request_id: str) -> list[dict[str, object]]:
        lines = [json.loads(line) for line in self.log.getvalue().splitlines() if line]
        return [
            line
            for line in lines
            if line.get("event") == "request" and line.get("request_id") == request_id
        ]


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("registry", level="debug", stream=out)
    try:
        yield out
    finally:
        configure_logging("registry", level="info")


@pytest.fixture
async def edge(tmp_path: Path, captured: io.StringIO) -> AsyncIterator[Edge]:
    store = BrokenStore()
    digest = store.add_blob(MANIFEST)
    store.set_image(IMAGE, Descriptor(digest, len(MANIFEST)))
    async with (
        serve_registry(store, tmp_path, mirrors=["docker.io"]) as registry,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
    ):
        yield Edge(registry, session, captured)
    await store.close()


# (method, target, status, OCI code): one per way a request ends, ours and Sanic's.
CASES = [
    ("GET", "/v2/library/app/manifests/1.0?ns=docker.io", 200, None),
    ("GET", "/v2", 200, None),
    ("GET", "/v2/library/app/manifests/nope?ns=docker.io", 404, "MANIFEST_UNKNOWN"),
    ("DELETE", "/v2/library/app/manifests/1.0?ns=docker.io", 405, "UNSUPPORTED"),
    ("POST", "/v2", 405, "UNSUPPORTED"),
    ("POST", "/livez", 405, "UNSUPPORTED"),
    ("GET", "/no/such/route", 404, "UNSUPPORTED"),
    ("GET", "/v2?" + "q" * 5000, 414, "UNSUPPORTED"),
    ("GET", "/v2/library/app/manifests/broken?ns=docker.io", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/livez", 200, None),
]


@pytest.mark.parametrize(("method", "target", "status", "code"), CASES)
async def test_every_answer_has_its_id_one_log_line_and_an_oci_error(
    edge: Edge, method: str, target: str, status: int, code: str | None
) -> None:
    rid = f"edge-{method}-{abs(hash(target)) % 10**8}"
    got, headers, body = await edge.ask(method, target, rid)
    assert got == status, body
    assert headers.get("x-request-id") == rid
    if code is not None:
        assert headers["content-type"].startswith("application/json")
        assert headers["docker-distribution-api-version"] == "registry/2.0"
        errors = json.loads(body)["errors"]
        assert [e["code"] for e in errors] == [code], errors
        assert "Traceback" not in body.decode()
    if status == 405:
        assert "GET" in headers["allow"] and "POST" not in headers["allow"]
    lines = edge.request_lines(rid)
    assert len(lines) == 1, lines
    assert lines[0]["method"] == method
    assert lines[0]["path"] == target.partition("?")[0]
    assert lines[0]["status"] == status


async def test_headers_too_large_answered_with_an_id_and_logged_once(edge: Edge) -> None:
    rid = "edge-huge-head"
    got, headers, body = await edge.ask("GET", "/v2/", rid, **{"X-Big": "b" * 20000})
    assert got == 431
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    # The head was never parsed, so the client's id is unknown: the answer names a fresh one,
    # and the log line carries that one.
    made = headers["x-request-id"]
    assert len(made) == 32
    assert len(edge.request_lines(made)) == 1


async def test_a_failure_below_the_handler_is_a_counted_404_with_its_cause_logged(
    edge: Edge,
) -> None:
    stats = edge.registry.app.ctx.stats
    rid = "edge-bug"
    got, _, body = await edge.ask("GET", "/v2/library/app/manifests/broken?ns=docker.io", rid)
    assert got == 404
    assert "RuntimeError" in json.loads(body)["errors"][0]["message"]
    assert stats.count(RequestKind.MANIFEST, Result.ERROR) == 1
    assert stats.in_flight == 0
    (line,) = edge.request_lines(rid)
    assert line["result"] == "error"
    assert "bug below the handler" in str(line["exception"])


async def test_pull_api_counted_operational_routes_not(edge: Edge) -> None:
    stats = edge.registry.app.ctx.stats
    for target in ("/livez", "/readyz", "/metrics", "/no/such/route"):
        await edge.ask("GET", target, "edge-ops")
    assert stats.requests.total() == 0
    await edge.ask("GET", "/v2/", "edge-base")
    await edge.ask("GET", "/v2", "edge-base")
    assert stats.count(RequestKind.OTHER, Result.LOCAL_HIT) == 2


async def test_client_leaving_mid_body_ends_in_one_error_line(edge: Edge) -> None:
    store = edge.registry.app.ctx.content.keeper.store
    assert isinstance(store, MemoryStore)
    digest = store.add_blob(b"x" * (64 << 20))
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.registry.port)
    writer.write(
        f"GET /v2/a/blobs/{digest}?ns=docker.io HTTP/1.1\r\nHost: t\r\n"
        "X-Request-Id: edge-gone\r\n\r\n".encode()
    )
    await writer.drain()
    assert (await reader.read(4096)).startswith(b"HTTP/1.1 200")
    writer.transport.abort()
    await wait_until(lambda: edge.request_lines("edge-gone"), within=5)
    (line,) = edge.request_lines("edge-gone")
    assert line["result"] == "error"
    assert edge.registry.app.ctx.stats.in_flight == 0


async def test_a_failure_mid_body_cuts_the_answer_with_one_line_and_no_traceback(
    edge: Edge,
) -> None:
    store = edge.registry.app.ctx.content.keeper.store
    assert isinstance(store, BrokenStore)
    digest = store.add_blob(b"y" * (4 * store.read_chunk))
    store.failing = {digest}
    with pytest.raises(aiohttp.ClientPayloadError):
        await edge.ask("GET", f"/v2/a/blobs/{digest}?ns=docker.io", "edge-midbody")
    await wait_until(lambda: edge.request_lines("edge-midbody"), within=5)
    (line,) = edge.request_lines("edge-midbody")
    assert line["result"] == "error"
    assert line["status"] == 200
    assert "disk gone mid-body" in str(line["error"])
    # The reason is in the request's line, not in lines of Sanic's with a traceback.
    assert "Traceback" not in edge.log.getvalue()
    assert edge.registry.app.ctx.stats.count(RequestKind.BLOB, Result.ERROR) == 1
