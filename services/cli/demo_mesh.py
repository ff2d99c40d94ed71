"""Runs the local mesh of `peermirror demo`: N nodes' services as supervised child processes on
loopback, a seeded image on node 1, one pull through the last node's registry, and the report.

Every service is a real `peermirror <service> --config <node yaml>` process (nine for three
nodes), supervised by the node supervisor (restarts with backoff, SIGTERM/SIGINT passed on,
stragglers killed), each writing its log to `<workdir>/node<i>/<service>.log`. The children
follow this process: if it dies they get SIGTERM from the kernel, so nothing outlives the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.demo_plan import (
    DEMO_IMAGE,
    REGISTRIES_YAML,
    Listener,
    NodePlan,
    PullReport,
    ServedItem,
    answered,
    counter_deltas,
    node_config,
    peer_servers,
    plan_mesh,
    render_mesh_up,
    render_summary,
    servers_of,
)
from services.cli.demo_pull import (
    PullError,
    PullResult,
    pull_builtin,
    pull_with_skopeo,
)
from services.common.errors import PeermirrorError
from services.common.genproto.peermirror.discovery.v1 import local_pb2, local_pb2_grpc
from services.common.genproto.peermirror.registry.v1 import introspection_pb2 as reg_pb
from services.common.genproto.peermirror.registry.v1 import introspection_pb2_grpc as reg_grpc
from services.common.node_supervisor import SERVICES, NodeSupervisor, child_command
from services.common.oci.synthetic import BuiltImage, build_image
from services.common.store.oci_layout import OciLayoutStore

ClientChoice = Literal["auto", "skopeo", "builtin"]

# Marks a directory as the demo's own, so starting again may wipe it (and nothing else).
MARKER = ".peermirror-demo"
# Nine Python services importing gRPC and Sanic at once on two shared cores take a while.
READY_TIMEOUT_S = 120.0
ADVERTISE_TIMEOUT_S = 60.0
POLL_S = 0.2
RPC_TIMEOUT_S = 5.0
# A child restarted this often while the mesh starts is crash-looping: give up and say why.
MAX_START_RESTARTS = 3
LOG_TAIL_LINES = 15
# Nine interpreters tearing down gRPC and Sanic at once on two busy cores need more than the
# node's usual 4 s before they are killed.
STOP_TIMEOUT_S = 15.0
# Shell wrapper sending one child's output to its log file; `exec` keeps the pid, so the child
# is still the supervisor's direct child (it follows the supervisor by parent pid).
_REDIRECT = 'log=$1; shift; exec "$@" >>"$log" 2>&1'

Echo = Callable[[str], None]


class DemoError(PeermirrorError):
    """The demo cannot go on; the message says why (and where the logs are)."""


@dataclass(frozen=True)
class DemoOptions:
    """What `peermirror demo` was asked to do."""

    nodes: int
    base_port: int
    workdir: Path
    once: bool
    client: ClientChoice
    layers: int
    layer_size: int


class MeshLog:
    """The supervisor's log: every event as a JSON line in a file, trouble also on the console.

    Counts restarts per child, so a crash loop during start-up ends the demo quickly.
    """

    def __init__(self, path: Path, echo: Echo) -> None:
        self.path = path
        self._echo = echo
        self.restarts: dict[str, int] = {}

    def _write(self, level: str, event: str, kw: Mapping[str, object]) -> None:
        record = {"time": time.time(), "level": level, "event": event, **kw}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def info(self, event: str, **kw: object) -> object:
        self._write("info", event, kw)
        return None

    def warning(self, event: str, **kw: object) -> object:
        self._write("warning", event, kw)
        child = kw.get("child")
        if event == "child exited, restarting" and isinstance(child, str):
            self.restarts[child] = self.restarts.get(child, 0) + 1
            self._echo(
                f"demo: {child} exited with {kw.get('returncode')}, restarting "
                f"(log: {child_log(self.path.parent, child)})"
            )
        return None

    def error(self, event: str, **kw: object) -> object:
        self._write("error", event, kw)
        self._echo(f"demo: {event} {kw}")
        return None


def child_name(node: NodePlan, service: str) -> str:
    return f"{node.name}-{service}"


def child_log(workdir: Path, child: str) -> Path:
    node, _, service = child.partition("-")
    return workdir / node / f"{service}.log"


def service_argv(service: str, config: Path, log: Path) -> list[str]:
    """The argv running one service with its output appended to `log`."""
    return ["/bin/sh", "-c", _REDIRECT, "sh", str(log), *child_command(service, config)]


def prepare_workdir(workdir: Path) -> None:
    """Make `workdir` an empty demo directory; refuses a non-empty directory not made by us."""
    if workdir.exists():
        if not workdir.is_dir():
            raise DemoError(f"--workdir {workdir} exists and is not a directory")
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise DemoError(
                f"--workdir {workdir} is not empty and was not made by `peermirror demo`; "
                "choose another directory"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("peermirror demo working directory: wiped on every start\n")


def ports_in_use(ports: Sequence[int]) -> list[int]:
    """The ports of `ports` something on 127.0.0.1 already listens on (or holds)."""
    busy: list[int] = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def write_configs(nodes: Sequence[NodePlan], workdir: Path) -> Path:
    """Write registries.yaml and every node's config; returns the registries file."""
    registries = workdir / "registries.yaml"
    registries.write_text(REGISTRIES_YAML, encoding="utf-8")
    for node in nodes:
        node.directory.mkdir(parents=True, exist_ok=True)
        data = node_config(node, nodes[0], registries)
        node.config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return registries


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# --- talking to the nodes ----------------------------------------------------------------------


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def _http_ready(url: str) -> bool:
    # An empty proxy table: only loopback is contacted, whatever *_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/readyz", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


async def service_ready(node: NodePlan, service: str) -> bool:
    """Whether one service of `node` says it is ready (gRPC health, the registry's /readyz)."""
    if service == "registry":
        return await asyncio.to_thread(_http_ready, node.registry_url)
    address = node.address(
        Listener.DISCOVERY_LOCAL if service == "discovery" else Listener.PINNER_GRPC
    )
    return await _serving(address)


async def wait_ready(nodes: Sequence[NodePlan], workdir: Path, log: MeshLog) -> None:
    """Return once every service of every node reports ready; DemoError on a crash loop or
    when the time is up (naming what is not ready, with its log's tail)."""
    pending = {child_name(n, s): (n, s) for n in nodes for s in SERVICES}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    while True:
        for child, (node, service) in list(pending.items()):
            if log.restarts.get(child, 0) >= MAX_START_RESTARTS:
                log_path = child_log(workdir, child)
                raise DemoError(
                    f"{child} keeps exiting; last lines of {log_path}:\n{_tail(log_path)}"
                )
            if await service_ready(node, service):
                del pending[child]
        if not pending:
            return
        if loop.time() > deadline:
            child = sorted(pending)[0]
            log_path = child_log(workdir, child)
            raise DemoError(
                f"not ready after {READY_TIMEOUT_S:.0f} s: {', '.join(sorted(pending))}; "
                f"last lines of {log_path}:\n{_tail(log_path)}"
            )
        await asyncio.sleep(POLL_S)


async def advertised_keys(node: NodePlan) -> set[str]:
    """What `node`'s discovery advertises for it."""
    async with grpc.aio.insecure_channel(node.address(Listener.DISCOVERY_LOCAL)) as channel:
        stub = local_pb2_grpc.LocalDiscoveryStub(channel)
        keys: set[str] = set()
        call = stub.ListAdvertised(local_pb2.ListAdvertisedRequest(), timeout=RPC_TIMEOUT_S)
        async for resp in call:
            keys.update(resp.keys)
        return keys


async def providers(
    node: NodePlan, keys: Sequence[str], by_port: Mapping[int, str]
) -> dict[str, set[str]]:
    """Per key, the mesh nodes `node`'s discovery names as providers."""
    found: dict[str, set[str]] = {}
    async with grpc.aio.insecure_channel(node.address(Listener.DISCOVERY_LOCAL)) as channel:
        stub = local_pb2_grpc.LocalDiscoveryStub(channel)
        for key in keys:
            names: set[str] = set()
            request = local_pb2.FindProvidersRequest(key=key, limit=len(by_port))
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for resp in stub.FindProviders(request, timeout=RPC_TIMEOUT_S):
                    name = by_port.get(resp.provider.registry_port)
                    if name is not None:
                        names.add(name)
            found[key] = names
    return found


async def wait_findable(
    seed: NodePlan, puller: NodePlan, keys: Sequence[str], by_port: Mapping[int, str]
) -> dict[str, set[str]]:
    """Wait until `seed` advertises every key and `puller`'s discovery finds `seed` for each;
    returns the providers per key."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ADVERTISE_TIMEOUT_S
    want = set(keys)
    while True:
        missing: set[str] = set()
        with contextlib.suppress(grpc.aio.AioRpcError):
            missing = want - await advertised_keys(seed)
        if not missing:
            found = await providers(puller, keys, by_port)
            missing = {k for k, names in found.items() if seed.name not in names}
            if not missing:
                return found
            where = f"{puller.name}'s discovery does not find {seed.name} for"
        else:
            where = f"{seed.name} does not advertise"
        if loop.time() > deadline:
            raise DemoError(
                f"after {ADVERTISE_TIMEOUT_S:.0f} s {where} {len(missing)} of {len(want)} keys "
                f"(e.g. {sorted(missing)[0]}); see {seed.directory}/pinner.log and */discovery.log"
            )
        await asyncio.sleep(POLL_S)


async def registry_counters(node: NodePlan) -> dict[str, int]:
    """The registry counters the report uses, from `node`'s introspection API."""
    async with grpc.aio.insecure_channel(node.address(Listener.REGISTRY_GRPC)) as channel:
        stub = reg_grpc.RegistryIntrospectionStub(channel)
        stats = await stub.Stats(reg_pb.StatsRequest(), timeout=RPC_TIMEOUT_S)
    counters = {
        "manifest_peer": 0,
        "blob_peer": 0,
        "bytes_served_local": stats.bytes_served_local,
        "bytes_relayed": stats.bytes_relayed,
    }
    for count in stats.requests:
        if count.from_peer and count.result == reg_pb.REQUEST_RESULT_LOCAL_HIT:
            if count.kind == reg_pb.REQUEST_KIND_MANIFEST:
                counters["manifest_peer"] += count.count
            elif count.kind == reg_pb.REQUEST_KIND_BLOB:
                counters["blob_peer"] += count.count
    return counters


async def all_counters(nodes: Sequence[NodePlan]) -> dict[str, dict[str, int]]:
    results = await asyncio.gather(*(registry_counters(n) for n in nodes))
    return {n.name: c for n, c in zip(nodes, results, strict=True)}


# --- the scenario ------------------------------------------------------------------------------


async def pull(options: DemoOptions, puller: NodePlan, dest: Path) -> PullResult:
    """Pull the demo image through `puller`'s registry with the chosen client."""
    skopeo = shutil.which("skopeo")
    if options.client == "skopeo" and skopeo is None:
        raise DemoError("--client skopeo: skopeo is not installed (Debian package `skopeo`)")
    try:
        if skopeo is not None and options.client != "builtin":
            registry = puller.address(Listener.REGISTRY)
            return await pull_with_skopeo(skopeo, registry, DEMO_IMAGE, dest)
        return await pull_builtin(puller.registry_url, DEMO_IMAGE, dest)
    except PullError as exc:
        raise DemoError(
            f"pull through {puller.name} failed: {exc}\n  see {puller.directory}/registry.log"
        ) from exc


def report_of(
    result: PullResult,
    found: Mapping[str, set[str]],
    before: Mapping[str, Mapping[str, int]],
    after: Mapping[str, Mapping[str, int]],
    puller: NodePlan,
    seed: NodePlan,
) -> PullReport:
    """The summary's data: per item the nodes that served it (see `servers_of`)."""
    deltas = counter_deltas(before, after)
    peers_for = {
        "manifest": answered(deltas, "manifest_peer"),
        "blob": answered(deltas, "blob_peer"),
    }
    items = [
        ServedItem(
            **dataclasses.asdict(item),
            served_by=servers_of(
                found.get(item.digest, set()),
                peers_for["manifest" if item.kind in ("index", "manifest") else "blob"],
                puller.name,
            ),
        )
        for item in result.items
    ]
    return PullReport(
        image=DEMO_IMAGE,
        seed=seed.name,
        puller=puller.name,
        puller_url=puller.registry_url,
        client=result.client,
        seconds=result.seconds,
        items=items,
        relayed_bytes=deltas.get(puller.name, {}).get("bytes_relayed", 0),
        peers=peer_servers(deltas, puller.name),
    )


async def scenario(
    options: DemoOptions, nodes: Sequence[NodePlan], image: BuiltImage, log: MeshLog, echo: Echo
) -> PullReport:
    """Wait for the mesh, seed node 1, pull through the last node; the report of that pull."""
    seed, puller = nodes[0], nodes[-1]
    await wait_ready(nodes, options.workdir, log)
    echo(f"demo: {len(nodes)} nodes ready; seeding {DEMO_IMAGE} on {seed.name}")
    store = OciLayoutStore(seed.layout_path, create=True)
    await asyncio.to_thread(store.set_image, image.name, image.target, image.blob_paths)
    keys = [image.name, *(b.digest for b in image.blobs)]
    by_port = {n.port(Listener.REGISTRY): n.name for n in nodes}
    found = await wait_findable(seed, puller, keys, by_port)
    echo(f"demo: {puller.name}'s discovery finds {seed.name} for all {len(keys)} keys; pulling")
    before = await all_counters(nodes)
    result = await pull(options, puller, options.workdir / "pulled")
    after = await all_counters(nodes)
    return report_of(result, found, before, after, puller, seed)


def _strip_config_overrides() -> None:
    # Each node's config is generated: PEERMIRROR_<SECTION>__<KEY> from the caller's shell would
    # apply to all nodes at once (same ports for all, say), so the children must not see them.
    for var in [v for v in os.environ if v.startswith("PEERMIRROR_") and "__" in v]:
        del os.environ[var]
    os.environ["PYTHONUNBUFFERED"] = "1"


async def run_demo(options: DemoOptions, echo: Echo) -> int:
    """The whole demo; returns the exit code (0, 1 on failure, 130 when interrupted early)."""
    try:
        nodes = plan_mesh(options.nodes, options.base_port, options.workdir)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    busy = ports_in_use([p for n in nodes for p in n.ports])
    if busy:
        raise DemoError(
            f"ports already in use on 127.0.0.1: {', '.join(map(str, busy[:10]))}; "
            "is another demo running? (choose another --base-port)"
        )
    prepare_workdir(options.workdir)
    write_configs(nodes, options.workdir)
    image = await asyncio.to_thread(
        build_image,
        options.workdir / "seed",
        DEMO_IMAGE,
        layers=options.layers,
        layer_size=options.layer_size,
        cheap_data=True,
        compresslevel=0,
    )
    _strip_config_overrides()
    commands = {
        child_name(node, service): service_argv(
            service, node.config_path, node.directory / f"{service}.log"
        )
        for node in nodes
        for service in SERVICES
    }
    log = MeshLog(options.workdir / "supervisor.log", echo)
    supervisor = NodeSupervisor(commands, log, stop_timeout=STOP_TIMEOUT_S)
    echo(
        f"demo: starting {len(nodes)} nodes ({len(commands)} processes) on 127.0.0.1, "
        f"work directory {options.workdir}"
    )
    supervising = asyncio.create_task(supervisor.run(), name="demo-supervisor")
    running = asyncio.create_task(scenario(options, nodes, image, log, echo), name="demo-pull")
    code = 0
    try:
        await asyncio.wait({supervising, running}, return_when=asyncio.FIRST_COMPLETED)
        if not running.done():
            # SIGINT/SIGTERM while starting or pulling: the supervisor is already stopping.
            echo("demo: interrupted")
            code = 130
        else:
            try:
                report = running.result()
            except DemoError as exc:
                echo(f"demo: {exc}")
                code = 1
            else:
                for line in render_summary(report):
                    echo(line)
                if any(not item.verified for item in report.items):
                    code = 1
                elif not options.once:
                    for line in render_mesh_up(nodes, options.workdir):
                        echo(line)
                    await asyncio.shield(supervising)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        supervisor.request_stop()
        await supervising
        echo("demo: mesh stopped")
    return code


def main(options: DemoOptions) -> int:
    """Entry point of `peermirror demo` after argument parsing."""

    def echo(line: str) -> None:
        print(line, flush=True)

    try:
        return asyncio.run(run_demo(options, echo))
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1
