"""The node-local /metrics listener of discovery and pinner, on a loopback port."""

from __future__ import annotations

import asyncio

from prometheus_client import Counter

from services.common.metrics import MetricsListener, new_registry, start_listener
from tests.harness.metrics_scrape import Samples


async def fetch(port: int, request: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


async def test_serves_the_registry_and_refreshes_first() -> None:
    registry = new_registry("pinner")
    hits = Counter("peermirror_test_things", "things", registry=registry)
    refreshed: list[int] = []

    async def refresh() -> None:
        refreshed.append(1)
        hits.inc()

    listener = MetricsListener("127.0.0.1:0", registry, refresh=refresh)
    port = await listener.start()
    try:
        status, body = await fetch(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        samples = Samples.parse(body.decode())
        assert samples.value("peermirror_test_things_total") == 1
        assert samples.value("peermirror_build_info", service="pinner") == 1
        assert "peermirror_test_things_created" not in samples.names()
        assert (await fetch(port, b"GET /other HTTP/1.1\r\n\r\n"))[0].endswith("404 Not Found")
        assert (await fetch(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0].endswith(
            "405 Method Not Allowed"
        )
        status, body = await fetch(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status.endswith("200 OK") and body == b""
        assert len(refreshed) == 2
    finally:
        await listener.stop()


async def test_a_failing_refresh_still_answers() -> None:
    async def refresh() -> None:
        raise RuntimeError("containerd gone")

    listener = MetricsListener("127.0.0.1:0", new_registry("pinner"), refresh=refresh)
    port = await listener.start()
    try:
        status, body = await fetch(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status.endswith("200 OK")
        assert b"peermirror_build_info" in body
    finally:
        await listener.stop()


async def test_taken_address_or_empty_means_no_listener() -> None:
    first = MetricsListener("127.0.0.1:0", new_registry("discovery"))
    port = await first.start()
    try:
        taken = await start_listener(f"127.0.0.1:{port}", new_registry("x"), service="discovery")
        assert taken is None
        assert await start_listener("", new_registry("x"), service="discovery") is None
    finally:
        await first.stop()
