"""N peermirror nodes on one machine, each in its own network namespace with its own containerd.

A node is a namespace `pmm-<token>-n<i>` with `eth0` = `10.213.<x>.<i>/24` on a per-mesh bridge,
a real containerd (its socket in the node's dir, so `ctr` works from the test process) and the
three services run as `ip netns exec <ns> python -m services.cli.main <service> --config F`.
Node-local gRPC APIs listen on unix sockets in the node's dir (127.0.0.1 inside a namespace is
that namespace's own loopback, out of the test process's reach); discovery listens on
`<ip>:5001` and the registry on `<ip>:<registry port>` (6443 unless a test gives another).
Nodes 2..N bootstrap from node 1.

`Mesh(tls=True)` runs the mesh over mutual TLS: one cluster CA in the mesh's work dir, a node
certificate per node (its SANs name the node's IP and loopback), `tls.enabled` in every config,
and `pinner.mirror_tls` so containerd reaches its own mirror at https://127.0.0.1:<port> with the
CA (`ca`) and the node's pair (`client`) from hosts.toml. `registry_url` is then https and the
harness's own requests to a registry (`MeshNode.registry_get`, readiness) present the node's
certificate.

containerd reads the hosts.toml files the pinner writes from the node's registries.yaml
(`docker.io` and `registry.test:5000` mirrored by default); every endpoint besides the node's
own mirror, the default (`server`) one included, is `http://127.0.0.1:9` where nothing listens,
so no pull can leave the machine.

`MeshNode.isolate()` drops the node's traffic in its own iptables (a node that vanished, its
processes still running); `stop_service`/`kill_service`/`start_service` act on one service.
Timings and other settings come in through `Mesh(overrides=...)`, checked by the real loader.

Typical use::

    with Mesh(3) as mesh:
        n1, _, n3 = mesh.nodes
        n1.ctr("images", "import", "--all-platforms", str(archive))
        pull_via_mirror(n3, "docker.io/library/app:1")

Teardown (`close()`, the context exit, an atexit backstop, and a sweep of crashed runs' debris
before the first mesh of a process starts) stops every process and deletes every namespace,
veth, bridge and temp dir the mesh made. Start and stop services only from the main thread: each
process is tied to the starting thread by `PR_SET_PDEATHSIG`, so nothing outlives a killed test
run.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml

from services.common.config import load_config
from services.common.pki import Issued, create_ca, issue_node, write_ca, write_node
from services.common.tls import TlsFiles, client_context
from tests.harness import netns
from tests.harness.containerd import ContainerdDaemon
from tests.harness.cpu_cgroup import CpuCgroup
from tests.harness.logs import log_tail
from tests.harness.service_procs import REPO_ROOT, health_status, http_get
from tests.harness.wait import WaitAborted, wait_for

SERVICES: tuple[str, ...] = ("discovery", "registry", "pinner")
DISCOVERY_PORT = 5001
REGISTRY_PORT = 6443
# Where every non-mirror endpoint points: a loopback port where nothing listens.
NOWHERE = "http://127.0.0.1:9"
DEFAULT_MIRRORS: Mapping[str, Sequence[str]] = {
    "docker.io": (NOWHERE,),
    "registry.test:5000": (NOWHERE,),
}
K8S_NAMESPACE = "k8s.io"

# Generous: two shared cores may be busy with other test processes while nine services import.
START_TIMEOUT = 60.0
# Services stop within 5 s of SIGTERM; past this they are killed (and the stop reported).
STOP_TIMEOUT = 10.0
PULL_TIMEOUT = 600.0

# Variables that must not reach a service: config overrides and proxies (traffic stays local).
_DROPPED_ENV_PREFIXES = ("PEERMIRROR_",)
_DROPPED_ENV = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


class MeshError(RuntimeError):
    """The mesh could not start, a command in it failed, or teardown left something behind."""


# --- pure config building ----------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in: mappings merge key by key, anything else replaces."""
    out: dict[str, Any] = dict(base)
    for key, value in override.items():
        current = out.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(current, value)
        else:
            out[key] = value
    return out


def registries_data(mirrors: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """A K3s registries.yaml document mirroring each registry with the given endpoints."""
    return {"mirrors": {host: {"endpoint": list(eps)} for host, eps in mirrors.items()}}


def node_config_data(
    *,
    name: str,
    ip: str,
    node_dir: Path,
    containerd_socket: str,
    content_root: Path,
    hosts_dir: Path,
    registry_port: int,
    bootstrap_peers: Sequence[str],
    tls_files: TlsFiles | None = None,
) -> dict[str, Any]:
    """The config of one mesh node (plain data, as written to its YAML file); with `tls_files`
    every listener and peer connection uses mutual TLS, and containerd dials its mirror over
    https."""
    tls: dict[str, Any] = {"enabled": False}
    if tls_files is not None:
        tls = {
            "enabled": True,
            "ca_file": str(tls_files.ca_file),
            "cert_file": str(tls_files.cert_file),
            "key_file": str(tls_files.key_file),
        }
    return {
        "node": {"name": name, "data_dir": str(node_dir / "data"), "address": ip},
        "log": {"level": "info", "format": "json"},
        "registry": {
            "host": "0.0.0.0",
            "port": registry_port,
            "grpc_address": f"unix:{node_dir / 'registry.sock'}",
            "registries_file": str(node_dir / "registries.yaml"),
        },
        "tls": tls,
        "discovery": {
            "host": "0.0.0.0",
            "port": DISCOVERY_PORT,
            "local_address": f"unix:{node_dir / 'discovery.sock'}",
            "bootstrap_peers": list(bootstrap_peers),
        },
        "pinner": {
            "grpc_address": f"unix:{node_dir / 'pinner.sock'}",
            "images_dir": str(node_dir / "images"),
            "certs_dir": str(hosts_dir),
            "write_hosts": True,
            # hosts.toml names the mirror with the scheme the registry serves; with TLS the pinner
            # adds `ca` and `client` from the tls section.
            "mirror_tls": tls_files is not None,
            # Debian's containerd is upstream 1.6: with the default endpoint disabled the last
            # mirror endpoint (127.0.0.1:9) becomes `server`, so nothing falls back to the
            # internet.
            "disable_default_endpoint": True,
            "containerd_flavour": "upstream",
            "containerd_version": "1.6",
        },
        "store": {
            "backend": "containerd",
            "containerd_address": containerd_socket,
            "containerd_namespace": K8S_NAMESPACE,
            "content_root": str(content_root),
        },
    }


# --- processes ---------------------------------------------------------------------------------


def _service_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_DROPPED_ENV_PREFIXES) and k.lower() not in _DROPPED_ENV
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _require_main_thread(what: str) -> None:
    # The kernel signals a PDEATHSIG child when the *thread* that forked it exits; a process
    # started from a worker thread would die with that thread.
    if threading.current_thread() is not threading.main_thread():
        raise MeshError(
            f"{what} must be called from the main thread (processes die with their thread)"
        )


class MeshProcess:
    """One long-running command inside a namespace, its stdout and stderr appended to `log_path`."""

    def __init__(
        self,
        name: str,
        namespace: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the command (a no-op while it runs); does not wait for readiness."""
        if self.running:
            return
        _require_main_thread(f"starting {self.name}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", *netns.exec_argv(self.namespace, self.argv)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_service_env(self._env),
                # A Ctrl-C aimed at pytest must not reach the services before teardown does.
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        """Process id while it runs; None otherwise."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run (None while running or never started)."""
        return None if self._proc is None else self._proc.poll()

    def terminate(self) -> None:
        """Send SIGTERM without waiting (to stop many processes at once, then `stop()` each)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit status (None if never
        started)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines, missing="(no output)")


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of `path` that is a JSON object, in order (other lines, e.g. tracebacks, are
    left out; read the file itself to see them)."""
    records: list[dict[str, Any]] = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


# Runs inside a namespace: one GET with no proxy, the outcome printed as one JSON object.
_HTTP_GET_SNIPPET = """
import base64, json, sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=float(sys.argv[2])) as r:
        status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
except OSError as e:
    print(json.dumps({"error": str(getattr(e, "reason", None) or e)}))
    sys.exit(0)
print(json.dumps({"status": status, "body": base64.b64encode(body).decode()}))
"""


# --- hosts and nodes ---------------------------------------------------------------------------


class NetnsHost:
    """A namespace on the mesh bridge with one address: the base of every node, and on its own a
    place for extra parts of a test (an upstream registry, a client)."""

    def __init__(self, label: str, namespace: str, ip: str, index: int, work_dir: Path) -> None:
        self.label = label
        self.ns = namespace
        self.ip = ip
        self.index = index
        self.dir = work_dir
        self.isolated = False
        self._extra: list[MeshProcess] = []

    def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside this namespace and wait; raises MeshError on failure if `check`."""
        result = subprocess.run(
            netns.exec_argv(self.ns, argv),
            capture_output=True,
            text=True,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            timeout=timeout,
            cwd=REPO_ROOT,
            env=_service_env(),
        )
        if check and result.returncode != 0:
            raise MeshError(
                f"[{self.label}] {' '.join(argv)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def popen(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> MeshProcess:
        """Start a long-running `argv` in this namespace (logged to `<dir>/logs/<name>.log`); the
        mesh stops it at teardown."""
        proc = MeshProcess(name, self.ns, argv, self.dir / "logs" / f"{name}.log", env)
        proc.start()
        self._extra.append(proc)
        return proc

    def http_get(self, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET `url` from inside this namespace; returns status and body (HTTP error statuses
        included). Raises ConnectionError when no answer came (refused, unreachable, timeout)."""
        out = self.exec(
            [sys.executable, "-c", _HTTP_GET_SNIPPET, url, str(timeout)], timeout=timeout + 30
        ).stdout
        answer = json.loads(out)
        if "error" in answer:
            raise ConnectionError(f"[{self.label}] GET {url}: {answer['error']}")
        return int(answer["status"]), base64.b64decode(answer["body"])

    def isolate(self) -> None:
        """Drop every packet to or from this host's address (in its own iptables): to its peers
        it is gone, while its processes keep running."""
        netns.isolate(self.ns)
        self.isolated = True

    def unisolate(self) -> None:
        """Undo `isolate()`."""
        netns.unisolate(self.ns)
        self.isolated = False

    def limit_egress(self, mbit: float, burst: int | None = None, latency_ms: int = 100) -> None:
        """Hold what this host sends to `mbit` Mbit/s (see netns.shaping_argv)."""
        netns.limit_egress(self.ns, mbit, burst, latency_ms)

    def unlimit_egress(self) -> None:
        """Undo `limit_egress`."""
        netns.unlimit_egress(self.ns)

    def stop_extra(self) -> list[str]:
        """Stop processes started with `popen`; returns problems (for teardown)."""
        problems = []
        for proc in self._extra:
            try:
                proc.stop()
            except Exception as exc:  # teardown goes on; the caller reports
                problems.append(f"{self.label}/{proc.name}: {exc}")
        return problems


class MeshNode(NetnsHost):
    """One peermirror node: namespace, containerd, config, and its three service processes."""

    def __init__(
        self,
        label: str,
        namespace: str,
        ip: str,
        index: int,
        work_dir: Path,
        *,
        registry_port: int,
        config: Mapping[str, Any],
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(label, namespace, ip, index, work_dir)
        self.name = label
        self.registry_port = registry_port
        self.tls = tls
        self._ssl_context: ssl.SSLContext | None = None
        self.containerd = ContainerdDaemon(
            base_dir=work_dir / "containerd", wrap=netns.exec_argv(namespace, [])
        )
        self.config_path = work_dir / "peermirror.yaml"
        self.config: dict[str, Any] = dict(config)
        self.logs: dict[str, Path] = {svc: work_dir / "logs" / f"{svc}.log" for svc in SERVICES}
        self.logs["containerd"] = self.containerd.log_path
        self.services: dict[str, MeshProcess] = {
            svc: MeshProcess(
                svc,
                namespace,
                [sys.executable, "-m", "services.cli.main", svc, "--config", str(self.config_path)],
                self.logs[svc],
            )
            for svc in SERVICES
        }

    # -- addresses ---------------------------------------------------------------------------

    @property
    def hosts_dir(self) -> Path:
        """containerd's certs.d: the pinner writes hosts.toml here, containerd reads it."""
        return self.containerd.hosts_dir

    @property
    def registry_url(self) -> str:
        """The node's registry as peers (and the test process, via the bridge) reach it."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.ip}:{self.registry_port}"

    def registry_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET `registry_url + path` from the test process, presenting this node's certificate
        when the mesh runs TLS; returns status and body (HTTP error statuses included)."""
        url = f"{self.registry_url}{path}"
        if self.tls is None:
            return http_get(url, timeout=timeout)
        if self._ssl_context is None:
            self._ssl_context = client_context(self.tls)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._ssl_context)
        )
        try:
            with opener.open(url, timeout=timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    @property
    def discovery_peer_address(self) -> str:
        return f"{self.ip}:{DISCOVERY_PORT}"

    def grpc_address(self, service: str) -> str:
        """The node-local gRPC address (a unix socket) of `service`, with standard health."""
        section = {"discovery": "local_address"}.get(service, "grpc_address")
        return str(self.config[service][section])

    # -- containerd ----------------------------------------------------------------------------

    def ctr(self, *args: str, namespace: str = K8S_NAMESPACE) -> str:
        """`ctr` against this node's containerd (from the test process: the socket is a file)."""
        return self.containerd.ctr(*args, namespace=namespace)

    # -- services ------------------------------------------------------------------------------

    def start_service(
        self, name: str, *, wait: bool = True, timeout: float = START_TIMEOUT
    ) -> None:
        """Start one service; with `wait`, return once it reports ready."""
        self.services[name].start()
        if wait:
            wait_ready([(self, name)], timeout)

    def stop_service(self, name: str, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM one service (SIGKILL after `timeout`); returns its exit status."""
        return self.services[name].stop(timeout)

    def kill_service(self, name: str) -> None:
        """SIGKILL one service: a crash, no graceful shutdown."""
        self.services[name].kill()

    def service_running(self, name: str) -> bool:
        return self.services[name].running

    def ready(self, name: str) -> bool:
        """Whether `name` answers as ready right now (gRPC health SERVING, registry /readyz)."""
        if name == "registry":
            try:
                status, _ = self.registry_get("/readyz", timeout=1.0)
            # Not up, something else answered, or (TLS) the handshake did not complete yet.
            except (OSError, http.client.HTTPException, ssl.SSLError):
                return False
            return status == 200
        try:
            return health_status(self.grpc_address(name), timeout=1.0) == "SERVING"
        except grpc.RpcError:
            return False

    def log_text(self, name: str) -> str:
        """Everything `name` (a service or "containerd") wrote so far."""
        try:
            return self.logs[name].read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_records(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines of service `name`, parsed, oldest first (all restarts)."""
        return read_json_lines(self.logs[name])


def wait_ready(pending: Iterable[tuple[MeshNode, str]], timeout: float = START_TIMEOUT) -> None:
    """Poll until every (node, service) is ready; MeshError naming the laggard (with its log)
    if one exits or the time runs out."""
    waiting = list(pending)

    def exited() -> str | None:
        for node, name in waiting:
            proc = node.services[name]
            if not proc.running:
                return f"{node.name}/{name} exited with {proc.returncode}:\n" + proc.log_tail()
        return None

    def all_ready() -> bool:
        waiting[:] = [(node, name) for node, name in waiting if not node.ready(name)]
        return not waiting

    def laggard() -> str:
        node, name = waiting[0]
        return f"{node.name}/{name} is not:\n" + node.services[name].log_tail()

    try:
        wait_for("every service ready", all_ready, timeout, 0.1, gone=exited, detail=laggard)
    except (WaitAborted, TimeoutError) as exc:
        raise MeshError(str(exc)) from None


def pull_via_mirror(
    node: MeshNode,
    ref: str,
    *,
    all_platforms: bool = True,
    platform: str | None = None,
    check: bool = True,
    timeout: float = PULL_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """`ctr -n k8s.io images pull --hosts-dir <node's certs.d> ref`, run inside the node's
    namespace so 127.0.0.1:<port> in hosts.toml is that node's own registry.

    Returns the finished process; with `check`, a failed pull raises MeshError with ctr's output.
    """
    args = ["images", "pull", "--hosts-dir", str(node.hosts_dir)]
    if platform is not None:
        args += ["--platform", platform]
    elif all_platforms:
        args.append("--all-platforms")
    args.append(ref)
    argv = node.containerd.ctr_argv(args, K8S_NAMESPACE)
    return node.exec(argv, check=check, timeout=timeout)


# --- the mesh ----------------------------------------------------------------------------------

_live_meshes: set[Mesh] = set()
_swept = False


def _close_live_meshes() -> None:
    # Backstop for runs that end without their fixtures' teardown (e.g. an interrupted session).
    for mesh in list(_live_meshes):
        with contextlib.suppress(Exception):
            mesh.close()


atexit.register(_close_live_meshes)


ConfigOverrides = Mapping[str, Any] | Callable[[int], Mapping[str, Any]]


class Mesh:
    """`size` nodes `n1..n<size>` on one bridge, started by `start()` (or `with`), all gone after
    `close()`.

    - `mirrors`: registries.yaml mirrors (registry -> endpoints) of every node.
    - `registry_ports`: per-node registry ports (default 6443 each).
    - `overrides`: config merged into every node's config (a mapping), or a function of the node
      number (1-based) returning it; the result is validated with the real config loader.
    - `services`: which services `start()` runs (all three by default).
    - `tls`: run every node over mutual TLS with one cluster CA (see the module docstring).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        mirrors: Mapping[str, Sequence[str]] = DEFAULT_MIRRORS,
        registry_ports: Sequence[int] | None = None,
        overrides: ConfigOverrides | None = None,
        services: Sequence[str] = SERVICES,
        parent_dir: Path | None = None,
        start_timeout: float = START_TIMEOUT,
        tls: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a mesh needs at least one node")
        if registry_ports is not None and len(registry_ports) != size:
            raise ValueError("registry_ports needs one port per node")
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services: {sorted(unknown)}")
        self.size = size
        self.mirrors = {host: tuple(eps) for host, eps in mirrors.items()}
        self.registry_ports = list(registry_ports or [REGISTRY_PORT] * size)
        self.overrides = overrides
        self.service_names = [s for s in SERVICES if s in services]
        self.parent_dir = parent_dir
        self.start_timeout = start_timeout
        self.tls = tls
        self.ca: Issued | None = None
        self.nodes: list[MeshNode] = []
        self.hosts: list[NetnsHost] = []
        self.lease: netns.MeshLease | None = None
        self._names: netns.MeshNames | None = None
        self.cgroups: dict[str, CpuCgroup] = {}

    # -- identity ----------------------------------------------------------------------------

    @property
    def token(self) -> str:
        """The token in every name this mesh made (kept after `close()`, to check for leaks)."""
        if self._names is None:
            raise MeshError("mesh not started")
        return self._names.token

    @property
    def bridge(self) -> str:
        if self._names is None:
            raise MeshError("mesh not started")
        return self._names.bridge

    @property
    def work_dir(self) -> Path:
        return self._lease().work_dir

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this mesh (nodes and extra hosts)."""
        return [h.ns for h in self.hosts]

    def _lease(self) -> netns.MeshLease:
        if self.lease is None:
            raise MeshError("mesh not started")
        return self.lease

    def node(self, name: str) -> MeshNode:
        """The node called `name` (`n1`...)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> Mesh:
        """Build the network, start every containerd and service, wait until all are ready.

        On any failure everything already made is torn down before the error propagates.
        """
        global _swept
        if self._names is not None:
            raise MeshError("a mesh starts once; make a new Mesh")
        _require_main_thread("Mesh.start")
        if not _swept:
            netns.sweep_leftovers()
            _swept = True
        self.lease = netns.MeshLease(self.parent_dir)
        self._names = self.lease.names
        _live_meshes.add(self)
        try:
            self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
        return self

    def _start(self) -> None:
        lease = self._lease()
        lease.claim_bridge()
        if self.tls:
            # One CA per mesh, its key beside the nodes' files in the work dir (gone at close).
            self.ca = create_ca(f"peermirror mesh {lease.names.token} CA")
            ca_dir = lease.work_dir / "ca"
            ca_dir.mkdir(mode=0o700, exist_ok=True)
            write_ca(ca_dir, self.ca)
        for i in range(1, self.size + 1):
            self._add_node(i)
        first = self.nodes[0]
        # Node 1 is everyone's bootstrap peer: start its discovery first (it imports while the
        # containerds come up) so the others join at their first attempt, without backoff.
        if "discovery" in self.service_names:
            first.services["discovery"].start()
        for node in self.nodes:
            node.containerd.start()
        if "discovery" in self.service_names:
            wait_ready([(first, "discovery")], self.start_timeout)
        pending: list[tuple[MeshNode, str]] = []
        for node in self.nodes:
            for name in self.service_names:
                if node is first and name == "discovery":
                    continue
                node.services[name].start()
                pending.append((node, name))
        wait_ready(pending, self.start_timeout)

    def _attach_host(self, label: str) -> tuple[str, str, int, Path]:
        lease = self._lease()
        assert lease.subnet is not None
        index = len(self.hosts) + 1
        namespace = lease.names.namespace(label)
        address = netns.host_address(lease.subnet, index)
        work = lease.work_dir / label
        work.mkdir(parents=True, exist_ok=True)
        netns.create_namespace(namespace)
        netns.attach(namespace, lease.names.bridge, lease.names.veth(index), address)
        return namespace, str(address.ip), index, work

    def _add_node(self, i: int) -> MeshNode:
        label = f"n{i}"
        namespace, ip, index, work = self._attach_host(label)
        containerd_dir = work / "containerd"
        bootstrap = [] if i == 1 else [self.nodes[0].discovery_peer_address]
        tls_files = self._issue_node_files(label, ip, work) if self.ca is not None else None
        data = node_config_data(
            name=label,
            ip=ip,
            node_dir=work,
            containerd_socket=str(containerd_dir / "containerd.sock"),
            content_root=containerd_dir / "root" / "io.containerd.content.v1.content",
            hosts_dir=containerd_dir / "certs.d",
            registry_port=self.registry_ports[i - 1],
            bootstrap_peers=bootstrap,
            tls_files=tls_files,
        )
        if self.overrides is not None:
            extra = self.overrides(i) if callable(self.overrides) else self.overrides
            data = deep_merge(data, extra)
        (work / "images").mkdir(exist_ok=True)
        (work / "registries.yaml").write_text(
            yaml.safe_dump(registries_data(self.mirrors), sort_keys=False), encoding="utf-8"
        )
        config_path = work / "peermirror.yaml"
        config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        # Fail here, naming the key, rather than as three services exiting at start.
        load_config(config_path, env={})
        node = MeshNode(
            label,
            namespace,
            ip,
            index,
            work,
            registry_port=int(data["registry"]["port"]),
            config=data,
            tls=tls_files,
        )
        if node.containerd.address != data["store"]["containerd_address"]:
            raise MeshError("containerd socket path and store.containerd_address disagree")
        self.nodes.append(node)
        self.hosts.append(node)
        return node

    def _issue_node_files(self, label: str, ip: str, work: Path) -> TlsFiles:
        """A certificate for node `label` at `ip`, signed by the mesh CA, written with the CA
        certificate into `<work>/tls`."""
        assert self.ca is not None
        tls_dir = work / "tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        write_node(tls_dir, issue_node(self.ca, label, ip), self.ca.cert)
        return TlsFiles.in_directory(tls_dir)

    def add_host(self, label: str) -> NetnsHost:
        """One more namespace on the bridge (next free address), e.g. for an upstream registry;
        torn down with the mesh."""
        _require_main_thread("Mesh.add_host")
        if any(h.label == label for h in self.hosts):
            raise ValueError(f"host {label!r} exists")
        namespace, ip, index, work = self._attach_host(label)
        host = NetnsHost(label, namespace, ip, index, work)
        self.hosts.append(host)
        return host

    def limit_ingress(self, host: NetnsHost, mbit: float) -> None:
        """Hold what `host` receives to `mbit` Mbit/s: the bridge's end of its veth sends at
        most that (with `host.limit_egress`, a link of that speed both ways); deleting the
        veth at close removes it."""
        netns.run(netns.shaping_argv(mbit, iface=self._lease().names.veth(host.index)))

    # -- CPU ------------------------------------------------------------------------------------

    def cap_cpu(self, cpus: float | None) -> dict[str, CpuCgroup]:
        """Puts each node's processes (containerd, its shims, the services) into a cgroup of
        its own, capped at `cpus` cores (None: accounted only): each node then behaves like a
        machine of that size instead of sharing every core with the others. Returns the groups
        by node name; `regroup()` after restarting a node's process; `close()` removes them."""
        for node in self.nodes:
            if node.name not in self.cgroups:
                self.cgroups[node.name] = CpuCgroup(f"peermirror-{self.token}-{node.name}", cpus)
            self.cgroups[node.name].create()
        self.regroup()
        return self.cgroups

    def regroup(self) -> None:
        """Moves every process now in a node's namespace into that node's cgroup."""
        for node in self.nodes:
            group = self.cgroups.get(node.name)
            if group is not None:
                group.enter(netns.namespace_pids(node.ns))

    # -- stop ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, delete every namespace, veth and the bridge, remove the temp dir.

        Every step runs even when an earlier one failed; problems are raised together at the end
        (a leak must fail the test run, not pass silently).
        """
        lease = self.lease
        if lease is None:
            return
        problems: list[str] = []
        # SIGTERM to every service at once, then wait: stops take seconds each.
        for node in self.nodes:
            for proc in node.services.values():
                proc.terminate()
        for node in self.nodes:
            for proc in node.services.values():
                try:
                    proc.stop()
                except Exception as exc:
                    problems.append(f"{node.name}/{proc.name}: {exc}")
        for host in self.hosts:
            problems += host.stop_extra()
        for node in self.nodes:
            try:
                # base_dir is ours: stop() only ends the daemon, the lease removes the files.
                node.containerd.stop()
            except Exception as exc:
                problems.append(f"{node.name}/containerd: {exc}")
        for host in self.hosts:
            try:
                netns.delete_namespace(host.ns)
            except Exception as exc:
                problems.append(f"namespace {host.ns}: {exc}")
            with contextlib.suppress(ValueError):
                netns.delete_link(lease.names.veth(host.index))
        netns.delete_link(lease.names.bridge)
        for group in self.cgroups.values():
            try:
                group.remove()
            except Exception as exc:
                problems.append(f"cgroup {group.dirs[0]}: {exc}")
        self.cgroups.clear()
        left = self.leftovers()
        if left:
            problems.append(f"still present after teardown: {left}")
        # Mounts made inside a node live in that `ip netns exec` mount namespace, gone with it,
        # so removing the work dir never descends into a mounted snapshot.
        lease.release()
        self.lease = None
        _live_meshes.discard(self)
        if problems:
            raise MeshError("mesh teardown: " + "; ".join(problems))

    def leftovers(self) -> list[str]:
        """Namespaces and links of this mesh that still exist (empty after a clean close)."""
        if self._names is None:
            return []
        token = self._names.token
        return [
            name
            for name in [*netns.list_namespaces(), *netns.list_links()]
            if netns.token_of(name) == token
        ]

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
