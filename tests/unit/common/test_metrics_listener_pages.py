"""Pages served by the node-local metrics listener next to /metrics (the registry's status)."""

from __future__ import annotations

from services.common.metrics import MetricsListener, new_registry
from tests.unit.common.test_metrics_listener import fetch


async def test_serves_pages_next_to_metrics() -> None:
    asked: list[str] = []

    async def status() -> tuple[str, bytes]:
        asked.append("status")
        return "text/html; charset=utf-8", b"<p>hello</p>"

    async def broken() -> tuple[str, bytes]:
        raise RuntimeError("no data")

    listener = MetricsListener(
        "127.0.0.1:0", new_registry("registry"), pages={"/status": status, "/broken": broken}
    )
    port = await listener.start()
    try:
        status_line, body = await fetch(port, b"GET /status?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_line == "HTTP/1.1 200 OK"
        assert body == b"<p>hello</p>"
        assert asked == ["status"]
        reader_line, body = await fetch(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader_line == "HTTP/1.1 200 OK" and b"peermirror_build_info" in body
        broken_line, _ = await fetch(port, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
        assert broken_line == "HTTP/1.1 500 Internal Server Error"
        missing_line, _ = await fetch(port, b"GET /statusx HTTP/1.1\r\nHost: x\r\n\r\n")
        assert missing_line == "HTTP/1.1 404 Not Found"
        post_line, _ = await fetch(port, b"POST /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert post_line == "HTTP/1.1 405 Method Not Allowed"
        assert asked == ["status"]
    finally:
        await listener.stop()
