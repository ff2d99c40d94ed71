"""HTTP load for registry benchmarks: a timed large-blob GET, ApacheBench for small requests.

Every client treats every server alike (same request bytes, same headers), so figures taken for
two registries in one run are comparable. The blob client is a plain socket reading into one
reused 1 MiB buffer: it costs far less CPU per byte than the servers it measures, and it checks
status, length and (optionally) the SHA-256 of what arrived, so a fast wrong answer never counts.
It speaks HTTP/1.1, as containerd does to every registry (its transport sets its own TLS
config and never asks for HTTP/2). :func:`curl_blob` times the same GET with curl, the client a
new user tries first; over TLS curl negotiates HTTP/2 with a server that offers it (Go's
registry does, peermirror does not), so it measures a different protocol on such a server.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

RECV_BUFFER = 1 << 20
HEADER_LIMIT = 64 * 1024


class LoadError(RuntimeError):
    """A load run could not be taken, or a server answered wrongly (the message says what)."""


@dataclass(frozen=True, slots=True)
class BlobFetch:
    """One timed GET of a whole blob."""

    status: int
    headers: dict[str, str]
    body_bytes: int
    seconds: float
    sha256: str | None
    protocol: str = "HTTP/1.1"

    @property
    def gb_per_s(self) -> float:
        """Body throughput in GB/s (10^9 bytes per second)."""
        return self.body_bytes / self.seconds / 1e9


def _request_bytes(host: str, port: int, target: str, headers: Mapping[str, str]) -> bytes:
    # Keep-alive, as containerd asks: the client closes once the body is in (see
    # services/registry/mirror/peer_socket.PeerSocket for why the server must not).
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and headers (names lower-cased) of an HTTP/1.1 response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise LoadError(f"not an HTTP response: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def fetch_blob(
    host: str,
    port: int,
    target: str,
    headers: Mapping[str, str] | None = None,
    *,
    verify: bool = False,
    timeout: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> BlobFetch:
    """GET `target` on a fresh connection (over TLS with `tls`) and read the body
    (Content-Length framed) to the end.

    The clock runs from sending the request to the last body byte (after the TLS handshake).
    With `verify` the body is hashed as it arrives (slower; use it on an untimed warm-up fetch).
    """
    buffer = bytearray(RECV_BUFFER)
    view = memoryview(buffer)
    hasher = hashlib.sha256() if verify else None
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=host))
        start = time.perf_counter()
        sock.sendall(_request_bytes(host, port, target, headers or {}))
        received = bytearray()
        while b"\r\n\r\n" not in received:
            n = sock.recv_into(buffer)
            if n == 0:
                raise LoadError(f"connection closed before the response head of {target}")
            received += view[:n]
            if len(received) > HEADER_LIMIT and b"\r\n\r\n" not in received[:HEADER_LIMIT]:
                raise LoadError(f"response head of {target} larger than {HEADER_LIMIT} bytes")
        head, _, first = bytes(received).partition(b"\r\n\r\n")
        status, response_headers = parse_response_head(head)
        length_text = response_headers.get("content-length")
        if length_text is None or not length_text.isdigit():
            raise LoadError(f"{target}: no usable Content-Length ({length_text!r})")
        expected = int(length_text)
        got = len(first)
        if hasher is not None:
            hasher.update(first)
        while got < expected:
            n = sock.recv_into(buffer, min(RECV_BUFFER, expected - got))
            if n == 0:
                raise LoadError(f"{target}: body cut after {got} of {expected} bytes")
            if hasher is not None:
                hasher.update(view[:n])
            got += n
        seconds = time.perf_counter() - start
    return BlobFetch(
        status=status,
        headers=response_headers,
        body_bytes=got,
        seconds=seconds,
        sha256=hasher.hexdigest() if hasher is not None else None,
    )


def curl_blob(
    url: str,
    headers: Mapping[str, str],
    *,
    tls_files: tuple[str, str, str] | None = None,
    timeout: float = 300.0,
) -> BlobFetch:
    """GET `url` with curl at its defaults (HTTP/2 over TLS where the server offers it), the
    body discarded; with `tls_files` (CA, certificate, key) as a client with a certificate.

    The clock runs from the request to the last body byte (curl's total time less its time to
    the start of the transfer, so the TLS handshake is left out as in :func:`fetch_blob`)."""
    curl = shutil.which("curl")
    if curl is None:
        raise LoadError("curl not found on PATH: install the Debian package `curl`")
    argv = [curl, "-sS", "-o", "/dev/null", "-w", _CURL_FIGURES]
    if tls_files is not None:
        argv += ["--cacert", tls_files[0], "--cert", tls_files[1], "--key", tls_files[2]]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    figures = done.stdout.split()
    if done.returncode != 0 or len(figures) != 5:
        raise LoadError(f"curl {url} failed ({done.returncode}): {done.stderr.strip()}")
    status, size, started, total, version = figures
    return BlobFetch(
        status=int(status),
        headers={},
        body_bytes=int(size),
        seconds=float(total) - float(started),
        sha256=None,
        protocol=f"HTTP/{version}",
    )


# Status, body bytes, seconds to the transfer's start, seconds in all, HTTP version.
_CURL_FIGURES = "%{http_code} %{size_download} %{time_pretransfer} %{time_total} %{http_version}"


@dataclass(frozen=True, slots=True)
class AbResult:
    """What one ApacheBench run reports."""

    complete: int
    requests_per_s: float
    failed: int
    non_2xx: int
    keep_alive: int


def _ab_field(output: str, label: str, default: str | None = None) -> str:
    match = re.search(rf"^{re.escape(label)}:\s*([0-9.]+)", output, re.MULTILINE)
    if match is None:
        if default is None:
            raise LoadError(f"no {label!r} in ab output:\n{output}")
        return default
    return match.group(1)


def parse_ab(output: str) -> AbResult:
    """Parse ApacheBench's text report."""
    return AbResult(
        complete=int(_ab_field(output, "Complete requests")),
        requests_per_s=float(_ab_field(output, "Requests per second")),
        failed=int(_ab_field(output, "Failed requests")),
        non_2xx=int(_ab_field(output, "Non-2xx responses", "0")),
        keep_alive=int(_ab_field(output, "Keep-Alive requests", "0")),
    )


def ab_binary() -> str:
    """Path of `ab`; LoadError naming the Debian package when it is missing."""
    found = shutil.which("ab")
    if found is None:
        raise LoadError("ab not found on PATH: install the Debian package `apache2-utils`")
    return found


def run_ab(
    url: str,
    *,
    method: str,
    headers: Mapping[str, str],
    connections: int,
    seconds: float,
) -> AbResult:
    """Run ApacheBench against `url` for `seconds` over `connections` keep-alive connections.

    ab rather than wrk: wrk cannot do HEAD (its parser waits for the body a HEAD answer's
    Content-Length announces). LoadError on any failed or non-2xx answer, or when the server
    did not keep connections alive (the figures would then measure connection set-up).
    """
    if method not in ("GET", "HEAD"):
        raise ValueError(f"ab runs GET or HEAD, not {method}")
    argv = [ab_binary(), "-q", "-k", f"-c{connections}", f"-t{seconds:g}", "-n", "100000000"]
    if method == "HEAD":
        argv.append("-i")
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 30)
    if done.returncode != 0:
        raise LoadError(f"ab {method} {url} failed ({done.returncode}): {done.stderr.strip()}")
    result = parse_ab(done.stdout)
    if result.failed or result.non_2xx or result.complete == 0:
        raise LoadError(
            f"{method} {url}: {result.failed} failed, {result.non_2xx} non-2xx answers\n"
            + done.stdout
        )
    if result.keep_alive < result.complete - connections:
        raise LoadError(f"{method} {url}: connections not kept alive\n{done.stdout}")
    return result
