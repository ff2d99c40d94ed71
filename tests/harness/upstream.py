"""Debian's docker-registry (distribution 2.8) as the upstream registry of a test.

One fixture for every test and benchmark that needs a real upstream: on a loopback port
(:func:`loopback_registry`) or inside a mesh namespace (:func:`start_in_netns`), serving plain
http, TLS with a test CA, HTTP basic auth (`htpasswd`, bcrypt entries from apache2-utils) or
token auth (`auth: token`, tokens signed by tests/harness/token_server.py and checked by the
registry against its rootcertbundle). Images are pushed with skopeo from the synthetic builder's
OCI layout (:func:`push_image`). The registry logs JSON lines, and :meth:`requests` reads back
every request it answered, so tests count what reached the upstream.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from services.common.pki import create_ca, issue_node
from tests.harness.images import BuiltImage
from tests.harness.service_procs import REPO_ROOT, free_port
from tests.harness.token_server import TOKEN_PATH, TokenPolicy
from tests.harness.wait import eventually

if TYPE_CHECKING:
    from tests.harness.mesh import MeshProcess, NetnsHost

BINARY = "docker-registry"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
BASIC_REALM = "peermirror-test"


class UpstreamError(RuntimeError):
    """The upstream registry could not be set up (missing package, did not start)."""


def registry_binary() -> str:
    """The docker-registry executable; UpstreamError naming the Debian package when missing."""
    found = shutil.which(BINARY)
    if found is None:
        raise UpstreamError(f"{BINARY!r} not on PATH: install the Debian package docker-registry")
    return found


@dataclass(frozen=True)
class ServerTls:
    """A test CA and a server certificate for the upstream's address (and loopback)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @property
    def ca_dir(self) -> Path:
        """A directory holding only the CA certificate (skopeo's --dest-cert-dir)."""
        return self.ca_file.parent

    @classmethod
    def create(cls, directory: Path, ip: str = "127.0.0.1") -> ServerTls:
        directory.mkdir(parents=True, exist_ok=True)
        ca = create_ca("peermirror test upstream CA")
        server = issue_node(ca, "upstream", ip)
        # The CA alone in its directory: skopeo's --*-cert-dir reads any *.key there as a
        # client key.
        (directory / "ca").mkdir(exist_ok=True)
        files = cls(directory / "ca" / "ca.crt", directory / "server.crt", directory / "server.key")
        files.ca_file.write_bytes(ca.cert_pem)
        files.cert_file.write_bytes(server.cert_pem)
        files.key_file.write_bytes(server.key_pem)
        return files


@dataclass(frozen=True)
class TokenAuth:
    """`auth: token` settings: the registry trusts tokens signed by the rootcertbundle's key."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass(frozen=True)
class UpstreamOptions:
    """What the upstream registry requires of its clients; all None = plain, anonymous http."""

    tls: ServerTls | None = None
    htpasswd: Path | None = None
    token: TokenAuth | None = None
    log_level: str = "info"
    # Access logs cost time in benchmarks; tests read requests from the app log either way.
    access_log: bool = False


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """An htpasswd file with bcrypt entries (the only kind distribution accepts)."""
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise UpstreamError("'htpasswd' not on PATH: install the Debian package apache2-utils")
    lines = []
    for user, password in users.items():
        out = subprocess.run(
            [htpasswd, "-nbB", user, password], check=True, capture_output=True, text=True
        ).stdout
        lines.append(out.strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def registry_config(addr: str, root: Path, options: UpstreamOptions) -> dict[str, Any]:
    """The docker-registry YAML config serving `root` on `addr` under `options`."""
    http: dict[str, Any] = {"addr": addr, "secret": "peermirror-test-upstream"}
    if options.tls is not None:
        http["tls"] = {
            "certificate": str(options.tls.cert_file),
            "key": str(options.tls.key_file),
        }
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {
            "level": options.log_level,
            "formatter": "json",
            "accesslog": {"disabled": not options.access_log},
        },
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": False},
        },
        "http": http,
    }
    if options.htpasswd is not None and options.token is not None:
        raise ValueError("htpasswd and token auth exclude each other")
    if options.htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": BASIC_REALM, "path": str(options.htpasswd)}}
    if options.token is not None:
        t = options.token
        config["auth"] = {
            "token": {
                "realm": t.realm,
                "service": t.service,
                "issuer": t.issuer,
                "rootcertbundle": str(t.rootcertbundle),
            }
        }
    return config


@dataclass
class DistributionRegistry:
    """A running docker-registry: where it listens and what it logged."""

    host: str
    port: int
    log_path: Path
    scheme: str
    storage: Path
    _stop: list[Any] = field(default_factory=list, repr=False)

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.hostport}"

    def log_records(self) -> list[dict[str, Any]]:
        """Every JSON line the registry logged (others skipped)."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def requests(self, method: str | None = None, path_part: str = "") -> list[dict[str, Any]]:
        """Requests the registry finished answering (its "response completed" lines), filtered
        by method and a part of the URI."""
        out = []
        for r in self.log_records():
            uri = r.get("http.request.uri")
            if not isinstance(uri, str) or "http.response.status" not in r:
                continue
            if method is not None and r.get("http.request.method") != method:
                continue
            if path_part in uri:
                out.append(r)
        return out

    def body_bytes(self, method: str = "GET", path_part: str = "") -> int:
        """Body bytes the registry wrote for the requests it answered (its own count, needs log
        level info); see `SentBytes` for a count below the application."""
        return sum(int(r.get("http.response.written", 0)) for r in self.requests(method, path_part))

    def stop(self) -> None:
        for stop in self._stop:
            stop()
        self._stop.clear()


SENT_COMMENT = "peermirror-upstream-sent"
# Segments that carry an answer: longer than any bare ACK or FIN (20 bytes of IP header, 20 of
# TCP and at most 40 of TCP options). An idle keep-alive closing is not something sent.
MIN_DATA_SEGMENT = 81
_COUNTER_LINE = re.compile(r"^\[(?P<packets>\d+):(?P<bytes>\d+)\] (?P<rule>-A OUTPUT .*)$")


@dataclass
class SentBytes:
    """An iptables counter in the upstream's namespace: IP bytes of the segments carrying data
    sent from its registry port (TCP/IP headers included; with segmentation offload on the veth
    they are a few per mille; bare ACKs and FINs left out). Counted by the kernel, outside every
    process of the test."""

    host: NetnsHost
    port: int

    @property
    def rule(self) -> list[str]:
        return [
            "OUTPUT", "-p", "tcp", "--sport", str(self.port),
            "-m", "length", "--length", f"{MIN_DATA_SEGMENT}:65535",
            "-m", "comment", "--comment", SENT_COMMENT, "-j", "ACCEPT",
        ]  # fmt: skip

    def install(self) -> SentBytes:
        """Add the counting rule (once); returns self."""
        present = self.host.exec(["iptables", "-w", "-C", *self.rule], check=False)
        if present.returncode != 0:
            self.host.exec(["iptables", "-w", "-A", *self.rule])
        return self

    def read(self) -> int:
        """Bytes counted since install (or the last `reset`)."""
        out = self.host.exec(["iptables-save", "-c", "-t", "filter"]).stdout
        for line in out.splitlines():
            m = _COUNTER_LINE.match(line)
            if m and SENT_COMMENT in m.group("rule") and f"--sport {self.port}" in m.group("rule"):
                return int(m.group("bytes"))
        raise UpstreamError(f"no {SENT_COMMENT} rule in {self.host.label}'s iptables")

    def reset(self) -> None:
        self.host.exec(["iptables", "-w", "-Z", "OUTPUT"])


def _popen_stopper(proc: subprocess.Popen[bytes]) -> Any:
    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    return stop


def _wait_listening(probe: Any, running: Any, log_path: Path) -> None:

    def listening() -> bool:
        if not running():
            raise UpstreamError(f"process exited: {log_path.read_text(errors='replace')}")
        return bool(probe())

    if not eventually(listening, START_TIMEOUT, interval=0.05):
        raise UpstreamError(f"{log_path.name}: nothing listened within {START_TIMEOUT} s")


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def loopback_registry(
    work: Path, options: UpstreamOptions | None = None, port: int | None = None
) -> Iterator[DistributionRegistry]:
    """A docker-registry on 127.0.0.1:<free port> under `work`; stopped on exit."""
    options = options or UpstreamOptions()
    binary = registry_binary()
    port = port or free_port()
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "registry.yml"
    storage = work / "data"
    config_path.write_text(
        yaml.safe_dump(registry_config(f"127.0.0.1:{port}", storage, options)), encoding="utf-8"
    )
    log_path = work / "registry.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "serve", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    scheme = "https" if options.tls is not None else "http"
    registry = DistributionRegistry("127.0.0.1", port, log_path, scheme, storage)
    registry._stop.append(_popen_stopper(proc))
    try:
        _wait_listening(lambda: _tcp_open("127.0.0.1", port), lambda: proc.poll() is None, log_path)
        yield registry
    finally:
        registry.stop()


_PROBE = (
    "import socket,sys\n"
    "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()\n"
    "except OSError:\n sys.exit(1)\n"
)


def _probe_in(host: NetnsHost, ip: str, port: int) -> bool:
    argv = [sys.executable, "-c", _PROBE, ip, str(port)]
    return host.exec(argv, check=False, timeout=10).returncode == 0


def start_in_netns(
    host: NetnsHost, options: UpstreamOptions | None = None, port: int = 5000
) -> DistributionRegistry:
    """A docker-registry on <host.ip>:`port` inside the namespace `host`; the mesh stops it at
    teardown (or call `stop()`)."""
    options = options or UpstreamOptions()
    binary = registry_binary()
    config_path = host.dir / "registry.yml"
    storage = host.dir / "data"
    config = registry_config(f"{host.ip}:{port}", storage, options)
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc: MeshProcess = host.popen("docker-registry", [binary, "serve", str(config_path)])
    scheme = "https" if options.tls is not None else "http"
    registry = DistributionRegistry(host.ip, port, proc.log_path, scheme, storage)
    registry._stop.append(proc.stop)

    _wait_listening(lambda: _probe_in(host, host.ip, port), lambda: proc.running, proc.log_path)
    return registry


@dataclass
class TokenServerProcess:
    """tests/harness/token_server.py running as a process; `realm` goes into `TokenAuth`."""

    realm: str
    log_path: Path
    _stop: list[Any] = field(default_factory=list, repr=False)

    def records(self) -> list[dict[str, Any]]:
        """The requests it answered (one JSON line each in its log)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and "grant" in record:
                    out.append(record)
        return out

    def stop(self) -> None:
        for stop in self._stop:
            stop()
        self._stop.clear()


def token_server_argv(listen: str, key_files: tuple[Path, Path], policy: TokenPolicy) -> list[str]:
    """The command line serving `policy` with the key pair (cert, key) on `listen`."""
    cert, key = key_files
    argv = [sys.executable, "-m", "tests.harness.token_server", "--listen", listen]
    argv += ["--cert", str(cert), "--key", str(key)]
    argv += ["--issuer", policy.issuer, "--service", policy.service]
    argv += [f"--user={user}:{password}" for user, password in policy.users.items()]
    argv += [f"--refresh-token={token}" for token in sorted(policy.refresh_tokens)]
    if policy.allow_anonymous:
        argv.append("--anonymous")
    return argv


def start_token_server(
    work: Path,
    policy: TokenPolicy,
    key_files: tuple[Path, Path],
    *,
    host: NetnsHost | None = None,
    port: int = 5001,
) -> TokenServerProcess:
    """A token server process: on 127.0.0.1:<free port> under `work`, or on <host.ip>:`port`
    inside the namespace `host` (stopped by the mesh at teardown); returned once it listens."""
    if host is None:
        ip, port = "127.0.0.1", free_port()
        work.mkdir(parents=True, exist_ok=True)
        log_path = work / "token-server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                token_server_argv(f"{ip}:{port}", key_files, policy),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        stop, running = _popen_stopper(proc), lambda: proc.poll() is None
    else:
        ip = host.ip
        mesh_proc = host.popen("token-server", token_server_argv(f"{ip}:{port}", key_files, policy))
        log_path, stop, running = mesh_proc.log_path, mesh_proc.stop, lambda: mesh_proc.running
    server = TokenServerProcess(f"http://{ip}:{port}{TOKEN_PATH}", log_path, [stop])

    def probe() -> bool:
        return _tcp_open(ip, port) if host is None else _probe_in(host, ip, port)

    try:
        _wait_listening(probe, running, server.log_path)
    except BaseException:
        server.stop()
        raise
    return server


def push_image(
    image: BuiltImage,
    registry: DistributionRegistry,
    repository: str | None = None,
    *,
    creds: tuple[str, str] | None = None,
    ca_dir: Path | None = None,
    via: NetnsHost | None = None,
) -> str:
    """Copy `image` from its OCI layout to `registry` as `<repository>:<tag>` with skopeo
    (default: the image's own repository); returns the reference pushed to."""
    dest = f"{registry.hostport}/{repository or image.repository}:{image.tag}"
    argv = ["skopeo", "copy", "--quiet"]
    if registry.scheme == "http":
        argv.append("--dest-tls-verify=false")
    elif ca_dir is not None:
        argv.append(f"--dest-cert-dir={ca_dir}")
    if creds is not None:
        argv.append(f"--dest-creds={creds[0]}:{creds[1]}")
    argv += [f"oci:{image.layout_dir}:{image.name}", f"docker://{dest}"]
    _run(argv, via)
    return dest


def _run(argv: Sequence[str], via: NetnsHost | None) -> None:
    if via is not None:
        via.exec(list(argv), timeout=300)
        return
    result = subprocess.run(
        argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300
    )
    if result.returncode != 0:
        raise UpstreamError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
