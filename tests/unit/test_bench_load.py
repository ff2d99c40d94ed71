"""The registry benchmark's own parts: report parsing, the blob client, the Go registry layout."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bench.distribution_registry import lay_out_storage, write_config
from bench.http_load import LoadError, curl_blob, fetch_blob, parse_ab, parse_response_head

AB_REPORT = """\
This is ApacheBench, Version 2.3 <$Revision$>

Benchmarking 127.0.0.1 (be patient).....done

Document Path:          /v2/library/bench/manifests/1.0
Document Length:        406 bytes

Concurrency Level:      16
Time taken for tests:   3.000 seconds
Complete requests:      9120
Failed requests:        0
Non-2xx responses:      3
Keep-Alive requests:    9120
Total transferred:      5271360 bytes
Requests per second:    3039.87 [#/sec] (mean)
Time per request:       5.263 [ms] (mean)
"""


def test_parse_ab_reads_the_summary() -> None:
    result = parse_ab(AB_REPORT)
    assert result.complete == 9120
    assert result.requests_per_s == pytest.approx(3039.87)
    assert result.failed == 0
    assert result.non_2xx == 3
    assert result.keep_alive == 9120


def test_parse_ab_without_non_2xx_line_counts_zero() -> None:
    report = AB_REPORT.replace("Non-2xx responses:      3\n", "")
    assert parse_ab(report).non_2xx == 0


def test_parse_ab_rejects_other_output() -> None:
    with pytest.raises(LoadError):
        parse_ab("apr_socket_recv: Connection refused (111)")


def test_parse_response_head() -> None:
    status, headers = parse_response_head(
        b"HTTP/1.1 206 Partial Content\r\nContent-Length: 12\r\nDocker-Content-Digest: sha256:ab"
    )
    assert status == 206
    assert headers == {"content-length": "12", "docker-content-digest": "sha256:ab"}
    with pytest.raises(LoadError):
        parse_response_head(b"SSH-2.0-OpenSSH\r\n")


@pytest.fixture
def one_shot_server() -> Iterator[tuple[int, bytes]]:
    """A loopback server answering one request with a 3 MiB body sent in uneven pieces."""
    body = bytes(range(256)) * (3 * 4096)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nX-Seen: yes\r\n\r\n"
            # Head and the first body bytes in one send, as servers do.
            conn.sendall(head.encode() + body[:1000])
            for start in range(1000, len(body), 700_001):
                conn.sendall(body[start : start + 700_001])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, body
    finally:
        thread.join(timeout=10)
        listener.close()


def test_fetch_blob_reads_the_whole_body_and_hashes_it(one_shot_server: tuple[int, bytes]) -> None:
    port, body = one_shot_server
    got = fetch_blob("127.0.0.1", port, "/blob", {"Accept": "*/*"}, verify=True)
    assert got.status == 200
    assert got.body_bytes == len(body)
    assert got.sha256 == hashlib.sha256(body).hexdigest()
    assert got.headers["x-seen"] == "yes"
    assert got.gb_per_s > 0


def test_lay_out_storage_links_blobs_and_writes_distribution_links(tmp_path: Path) -> None:
    blobs = {}
    for name in ("manifest", "config", "layer"):
        data = name.encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        blobs[name] = (digest, path)
    manifest = blobs["manifest"][0]
    root = tmp_path / "storage"
    lay_out_storage(
        root,
        "library/bench",
        "1.0",
        manifest,
        {digest: path for digest, path in blobs.values()},
        [blobs["config"][0], blobs["layer"][0]],
    )
    v2 = root / "docker/registry/v2"
    for digest, source in blobs.values():
        encoded = digest.removeprefix("sha256:")
        stored = v2 / "blobs/sha256" / encoded[:2] / encoded / "data"
        assert stored.stat().st_ino == source.stat().st_ino
    repo = v2 / "repositories/library/bench"
    for name in ("config", "layer"):
        digest = blobs[name][0]
        link = repo / "_layers/sha256" / digest.removeprefix("sha256:") / "link"
        assert link.read_text() == digest
    hexpart = manifest.removeprefix("sha256:")
    assert (repo / "_manifests/tags/1.0/current/link").read_text() == manifest
    assert (repo / "_manifests/tags/1.0/index/sha256" / hexpart / "link").read_text() == manifest
    assert (repo / "_manifests/revisions/sha256" / hexpart / "link").read_text() == manifest


def test_write_config_listens_on_loopback_only(tmp_path: Path) -> None:
    config = yaml.safe_load(write_config(tmp_path / "c.yml", tmp_path / "root", 5123).read_text())
    assert config["http"]["addr"] == "127.0.0.1:5123"
    assert config["storage"]["filesystem"]["rootdirectory"] == str(tmp_path / "root")
    assert config["log"]["accesslog"]["disabled"] is True


def test_curl_blob_times_the_body_and_names_the_protocol(
    one_shot_server: tuple[int, bytes],
) -> None:
    port, body = one_shot_server
    got = curl_blob(f"http://127.0.0.1:{port}/blob", {"Accept": "*/*"})
    assert got.status == 200
    assert got.body_bytes == len(body)
    assert got.protocol == "HTTP/1.1"
    assert got.seconds > 0


def test_curl_blob_reports_a_failed_transfer() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    # Nothing listens there any more: curl fails to connect, and says so.
    with pytest.raises(LoadError, match=r"curl .* failed"):
        curl_blob(f"http://127.0.0.1:{port}/blob", {})
