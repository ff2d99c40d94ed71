"""Starts peermirror services as real processes on free loopback ports (tests and benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness.wait import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
# Generous: two shared cores may be busy with other test processes while a service imports.
START_TIMEOUT = 30.0


# Ports handed out by this process, so two picks never collide before either listens.
_handed_out: set[int] = set()
# Where picks start below the ephemeral range; under 1024 needs privileges some tools refuse.
_LOWEST = 10000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (low, high), inclusive."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now and no client socket will take.

    Binding to port 0 would hand out an ephemeral port, and any outgoing connection (a test's
    own gRPC channel, say) may take that same port as its local port before the service
    listens. So the pick comes from below the ephemeral range, never twice per process.
    """
    low, _ = ephemeral_range()
    lowest = _LOWEST if low > _LOWEST + 1000 else 1024
    for _ in range(1000):
        port = random.randrange(lowest, low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {host} in [{lowest}, {low})")


@dataclass(frozen=True)
class NodePorts:
    """The loopback addresses one test node's services listen on."""

    registry_http: int
    registry_grpc: int
    discovery_local: int
    discovery_peer: int
    pinner_grpc: int

    @classmethod
    def pick(cls) -> NodePorts:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())

    def grpc_address(self, service: str) -> str:
        """The gRPC address (with health) of `service`."""
        port = {
            "registry": self.registry_grpc,
            "discovery": self.discovery_local,
            "pinner": self.pinner_grpc,
        }[service]
        return f"127.0.0.1:{port}"

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_http}"


def write_node_config(directory: Path, ports: NodePorts, **discovery: object) -> Path:
    """A node config using `ports` and an OCI-layout store under `directory` (no containerd);
    `discovery` sets more keys of the discovery section."""
    layout = directory / "oci-layout"
    layout.mkdir(parents=True, exist_ok=True)
    data = {
        "node": {"name": "test-node", "data_dir": str(directory / "data")},
        "log": {"level": "info", "format": "json"},
        "registry": {
            "host": "127.0.0.1",
            "port": ports.registry_http,
            "grpc_address": f"127.0.0.1:{ports.registry_grpc}",
            # Ephemeral: many test nodes share loopback, the fixed defaults would collide.
            "metrics_address": "127.0.0.1:0",
        },
        "tls": {"enabled": False},
        "discovery": {
            "host": "127.0.0.1",
            "port": ports.discovery_peer,
            "local_address": f"127.0.0.1:{ports.discovery_local}",
            "metrics_address": "127.0.0.1:0",
            **discovery,
        },
        "pinner": {
            "grpc_address": f"127.0.0.1:{ports.pinner_grpc}",
            "metrics_address": "127.0.0.1:0",
            "images_dir": str(directory / "images"),
            "certs_dir": str(directory / "certs.d"),
        },
        "store": {"backend": "oci-layout", "oci_layout_path": str(layout)},
    }
    path = directory / "peermirror.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def cli_argv(*args: str) -> list[str]:
    """argv running the `peermirror` CLI with the test interpreter."""
    return [sys.executable, "-m", "services.cli.main", *args]


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Runs the `peermirror` CLI as a process from async code: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *cli_argv(*args),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60.0)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _clean_env() -> dict[str, str]:
    # Settings from the caller's environment must not leak into the service under test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERMIRROR_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServiceProcess:
    """One started process with its stdout/stderr captured to files in `log_dir`."""

    def __init__(self, argv: Sequence[str], log_dir: Path, label: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{label}.stdout"
        self.stderr_path = log_dir / f"{label}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                list(argv), cwd=REPO_ROOT, stdout=out, stderr=err, env=_clean_env()
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> str | None:
        """Why a wait on this process can no longer succeed (it exited; its output), or None."""
        if self.proc.poll() is None:
            return None
        return f"exited with {self.proc.returncode}: {self.output_lines()}"

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM, then wait up to `timeout` seconds; raises TimeoutExpired if it hangs."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Make sure the process is gone (cleanup path)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output_lines(self) -> list[str]:
        """Every non-empty line the process wrote to stdout and stderr."""
        text = self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )
        return [line for line in text.splitlines() if line.strip()]

    def json_lines(self) -> list[dict[str, object]]:
        """The output parsed as one JSON object per line (raises on any other line)."""
        out = []
        for line in self.output_lines():
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"not a JSON object: {line!r}")
            out.append(obj)
        return out


@contextlib.contextmanager
def running(argv: Sequence[str], log_dir: Path, label: str) -> Iterator[ServiceProcess]:
    """Start `argv`; whatever happens, the process is gone when the block exits."""
    proc = ServiceProcess(argv, log_dir, label)
    try:
        yield proc
    finally:
        proc.kill()


def health_status(address: str, timeout: float = 1.0) -> str:
    """The standard grpc.health.v1 Check answer for the whole server, as a status name."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_serving(address: str, proc: ServiceProcess | None = None) -> None:
    """Poll the health service at `address` until it answers SERVING (ends early, with its
    output, if `proc` exits)."""
    last: str = "no answer"

    def serving() -> bool:
        nonlocal last
        try:
            last = health_status(address)
        except grpc.RpcError as exc:
            last = str(exc.code())
        return last == "SERVING"

    wait_for(
        f"{address} SERVING",
        serving,
        START_TIMEOUT,
        0.1,
        gone=proc.exited if proc is not None else None,
        detail=lambda: f"last: {last}",
    )


# No proxy from the environment: test traffic stays on loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET `url`; returns status and body (error statuses included)."""
    try:
        with _opener.open(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_http_ok(url: str) -> bytes:
    """Poll `url` until it answers 200; returns the body."""
    last: object = "no answer"
    body = b""

    def ok() -> bool:
        nonlocal last, body
        try:
            last, body = http_get(url)
        except OSError as exc:
            last = exc
        return last == 200

    wait_for(f"{url} answering 200", ok, START_TIMEOUT, 0.1, detail=lambda: f"last: {last}")
    return body
