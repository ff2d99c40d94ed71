"""A minimal HTTP/1.1 client on raw sockets: sends exactly the bytes a fuzz case builds."""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass

from tests.harness.fuzz_node import FuzzNode

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RawResponse:
    """One parsed response: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes


def exchange(port: int, request: bytes, timeout: float = TIMEOUT_S) -> RawResponse | None:
    """Send `request` to 127.0.0.1:`port` and read the response until the server closes;
    None when the server closed without answering (its choice for bytes that are not HTTP)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    return parse_response(raw) if raw else None


def parse_response(raw: bytes) -> RawResponse:
    """Split a complete response; raises ValueError when it is not one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"no complete response head in {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(parts[1]), headers, body)


def build_request(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """The bytes of one request (always Connection: close, so one exchange is one request)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def pull_served_image(node: FuzzNode) -> None:
    """GET the manifest of the image `node` serves and every blob it names; checks the bytes
    against their digests."""
    port = node.ports.registry_http
    manifest = exchange(
        port,
        build_request(
            "GET",
            "/v2/library/fuzz/manifests/1.0?ns=docker.io",
            [("Accept", node.image.target.media_type)],
        ),
    )
    assert manifest is not None and manifest.status == 200
    assert "sha256:" + hashlib.sha256(manifest.body).hexdigest() == node.image.target.digest
    parsed = json.loads(manifest.body)
    for desc in [parsed["config"], *parsed["layers"]]:
        blob = exchange(
            port, build_request("GET", f"/v2/library/fuzz/blobs/{desc['digest']}?ns=docker.io", [])
        )
        assert blob is not None and blob.status == 200
        assert "sha256:" + hashlib.sha256(blob.body).hexdigest() == desc["digest"]
