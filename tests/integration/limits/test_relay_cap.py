"""The relay caps on real processes: node A relays node B's blob, found through discovery.

The node's own containerd (a client at 127.0.0.1) has one node-wide budget; every other client
address (here other loopback addresses, which the registry treats like remote ones) its own cap.

Node B (registry, discovery, pinner over an OCI layout) holds one image and advertises it; node A
(registry and discovery, joined to B) holds another. Clients of A ask for B's large layer and do
not read the body, so A's relays stay in flight: the layer is far larger than what the loopback
socket buffers and the relay's own buffers take in before the client reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.oci.synthetic import BuiltImage, build_image
from tests.fuzz.raw_http import build_request, parse_response
from tests.harness.discovery_mesh import find_providers
from tests.harness.fuzz_node import write_limited_config
from tests.harness.metrics_scrape import Samples
from tests.harness.service_procs import (
    NodePorts,
    ServiceProcess,
    cli_argv,
    http_get,
    running,
    wait_http_ok,
    wait_serving,
)
from tests.harness.wait import wait_until

MAX_RELAYS = 2
MAX_LOCAL = 5
# Several times what a client's 64 KiB receive buffer, A's socket send buffer (4 MiB at most
# here) and the relay's four 1 MiB chunks hold: a relay whose client reads nothing cannot end.
LAYER_BYTES = 16 * 1024 * 1024
# A fixed receive buffer turns off the kernel's autotuning (up to 32 MiB here) for test clients.
CLIENT_RCVBUF = 64 * 1024
# The address containerd dials the registry from.
CONTAINERD = "127.0.0.1"
# Other source addresses on loopback: other clients as far as the registry can tell.
FIRST = "127.0.0.2"
SECOND = "127.0.0.3"
REMOTE = "docker.io/library/remote:1.0"
LOCAL = "docker.io/library/local:1.0"
REFUSAL = "client refused: too many peer relays in flight"
IN_FLIGHT = "peermirror_mirror_requests_in_flight"
WAIT_S = 30.0

pytestmark = pytest.mark.slow


@dataclass
class Nodes:
    a: NodePorts
    b: NodePorts
    a_registry: ServiceProcess
    remote: BuiltImage  # on B only
    local: BuiltImage  # on A only

    @property
    def remote_layer(self) -> str:
        return self.remote.platforms[0].layers[0].descriptor.digest

    @property
    def remote_config(self) -> str:
        return self.remote.platforms[0].config.digest

    @property
    def local_layer(self) -> str:
        return self.local.platforms[0].layers[0].descriptor.digest

    def refusals(self) -> list[dict[str, Any]]:
        """A's log lines naming a client refused for the relay cap."""
        found = []
        for text in self.a_registry.output_lines():
            with contextlib.suppress(ValueError):
                line = json.loads(text)
                if isinstance(line, dict) and line.get("event") == REFUSAL:
                    found.append(line)
        return found


def _node_config(
    directory: Path, ports: NodePorts, registry: dict[str, Any], **discovery: Any
) -> Path:
    path = write_limited_config(directory, ports, registry)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["discovery"].update(discovery)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    root = tmp_path_factory.mktemp("relay-cap")
    ports_a, ports_b = NodePorts.pick(), NodePorts.pick()
    remote, local = (
        build_image(
            root / node / "oci-layout",
            name=name,
            layers=1,
            layer_size=LAYER_BYTES,
            cheap_data=True,
            compresslevel=0,
        )
        for node, name in (("b", REMOTE), ("a", LOCAL))
    )
    config_b = _node_config(root / "b", ports_b, {})
    config_a = _node_config(
        root / "a",
        ports_a,
        {
            "peer_fetch": True,
            "max_relays_per_client": MAX_RELAYS,
            "max_local_relays": MAX_LOCAL,
            # Wide budgets for a busy shared machine: this is about the cap, not speed.
            "resolve_timeout": 5.0,
            "peer_timeout": 10.0,
        },
        bootstrap_peers=[f"127.0.0.1:{ports_b.discovery_peer}"],
    )
    logs = root / "logs"
    with contextlib.ExitStack() as stack:

        def start(service: str, config: Path, label: str) -> ServiceProcess:
            argv = cli_argv(service, "--config", str(config))
            return stack.enter_context(running(argv, logs, label))

        b_procs = {s: start(s, config_b, f"b-{s}") for s in ("discovery", "registry", "pinner")}
        a_registry = start("registry", config_a, "a-registry")
        # A joins through B, so B's discovery must be up first.
        wait_serving(ports_b.grpc_address("discovery"), b_procs["discovery"])
        a_discovery = start("discovery", config_a, "a-discovery")
        for ports, service, proc in (
            (ports_b, "registry", b_procs["registry"]),
            (ports_b, "pinner", b_procs["pinner"]),
            (ports_a, "registry", a_registry),
            (ports_a, "discovery", a_discovery),
        ):
            wait_serving(ports.grpc_address(service), proc)
        wait_http_ok(f"{ports_a.registry_url}/readyz")
        yield Nodes(ports_a, ports_b, a_registry, remote, local)


@pytest.fixture
async def joined(nodes: Nodes) -> Nodes:
    """`nodes` once A's discovery names B for every blob the tests relay."""

    async def found() -> bool:
        address = nodes.a.grpc_address("discovery")
        for key in (nodes.remote_layer, nodes.remote_config):
            if not await find_providers(address, key):
                return False
        return True

    await wait_until(found, within=WAIT_S, interval=0.2)
    return nodes


@dataclass
class Pending:
    """A request whose response head is read; the body is still in the socket."""

    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # The body of an error answer, read with the head.
    error_body: bytes = b""

    async def body(self) -> bytes:
        return await self.reader.readexactly(int(self.headers["content-length"]))

    def error(self) -> dict[str, Any]:
        """The single OCI error of a refusal."""
        errors = json.loads(self.error_body)["errors"]
        assert len(errors) == 1
        entry: dict[str, Any] = errors[0]
        return entry


@dataclass
class Client:
    """Requests to A's registry from one source address, each on its own connection."""

    port: int
    source: str
    open: list[Pending] = field(default_factory=list)

    async def request(
        self, path: str, *, method: str = "GET", headers: Sequence[tuple[str, str]] = ()
    ) -> Pending:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
            sock.bind((self.source, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        pending = Pending(0, {}, reader, writer)
        self.open.append(pending)
        writer.write(build_request(method, f"/v2/{path}?ns=docker.io", list(headers)))
        head = await reader.readuntil(b"\r\n\r\n")
        parsed = parse_response(head)
        pending.status, pending.headers = parsed.status, parsed.headers
        if parsed.status >= 400 and method != "HEAD":
            pending.error_body = await pending.body()
        return pending

    async def whole(self, path: str, digest: str) -> Pending:
        """GET `path` and read the body; asserts a 200 whose bytes hash to `digest`."""
        answer = await self.request(path)
        assert answer.status == 200, (answer.status, answer.error_body)
        assert _sha256(await answer.body()) == digest
        return answer

    def close(self) -> None:
        for pending in self.open:
            pending.writer.close()


@contextlib.asynccontextmanager
async def clients(port: int) -> AsyncIterator[tuple[Client, Client]]:
    first, second = Client(port, FIRST), Client(port, SECOND)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _refused(answer: Pending, limit: str = "max_relays_per_client", most: int = MAX_RELAYS) -> None:
    assert answer.status == 429
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.error()
    assert error["code"] == "TOOMANYREQUESTS"
    assert error["detail"] == {"limit": limit, "max": most}
    assert str(most) in error["message"]


def _in_flight(nodes: Nodes) -> float:
    status, body = http_get(f"{nodes.a.registry_url}/metrics")
    assert status == 200
    return Samples.parse(body.decode()).value(IN_FLIGHT)


async def _hold_relays(client: Client, nodes: Nodes, count: int = MAX_RELAYS) -> list[Pending]:
    """`count` relays of B's layer for `client`, heads read, bodies left unread."""
    held = [
        await client.request(f"library/remote/blobs/{nodes.remote_layer}") for _ in range(count)
    ]
    for answer in held:
        assert answer.status == 200
        assert int(answer.headers["content-length"]) > LAYER_BYTES
    return held


async def test_one_client_is_capped_others_are_served_and_logged_once(joined: Nodes) -> None:
    nodes = joined
    layer = f"library/remote/blobs/{nodes.remote_layer}"
    config = f"library/remote/blobs/{nodes.remote_config}"
    async with clients(nodes.a.registry_http) as (first, second):
        held = await _hold_relays(first, nodes)
        assert _in_flight(nodes) == MAX_RELAYS
        # Past the cap every relay is refused: blobs, manifests, HEAD, and a forwarded-for
        # header does not make the client someone else.
        _refused(await first.request(layer))
        _refused(await first.request(config))
        _refused(await first.request("library/remote/manifests/1.0"))
        _refused(await first.request(layer, headers=[("X-Forwarded-For", "192.0.2.7")]))
        refused_head = await first.request(layer, method="HEAD")
        assert refused_head.status == 429
        # Another client is served meanwhile, and capped on its own.
        held += await _hold_relays(second, nodes)
        # The refusals are over; what A still answers is the relays held.
        assert _in_flight(nodes) == 2 * MAX_RELAYS
        _refused(await second.request(layer))
        _refused(await second.request(config))
        # Every relay held completes, verified.
        bodies = await asyncio.gather(*(answer.body() for answer in held))
        assert [_sha256(body) for body in bodies] == [nodes.remote_layer] * len(held)
        # A relay holds its slot until its handler ends, which is a little after its last byte.
        await wait_until(lambda: _in_flight(nodes) == 0, within=WAIT_S)
        await first.whole(config, nodes.remote_config)
        await second.whole(config, nodes.remote_config)
    refusals = nodes.refusals()
    assert sorted(str(line["client"]) for line in refusals) == [FIRST, SECOND]
    for line in refusals:
        assert line["limit"] == "max_relays_per_client"
        assert line["max"] == MAX_RELAYS
        assert line["level"] == "warning"


async def test_local_reads_are_never_capped(joined: Nodes) -> None:
    nodes = joined
    local = f"library/local/blobs/{nodes.local_layer}"
    async with clients(nodes.a.registry_http) as (first, _):
        held = await _hold_relays(first, nodes)
        # With its relays at the cap, the client still reads A's own content, more at once
        # than the cap allows relays.
        reads = [await first.request(local) for _ in range(MAX_RELAYS + 2)]
        assert [r.status for r in reads] == [200] * len(reads)
        assert _in_flight(nodes) == len(held) + len(reads)
        assert (await first.request(local, method="HEAD")).status == 200
        manifest = await first.request(
            "library/local/manifests/1.0", headers=[("Accept", nodes.local.target.media_type)]
        )
        assert manifest.status == 200
        assert _sha256(await manifest.body()) == nodes.local.target.digest
        bodies = await asyncio.gather(*(r.body() for r in reads + held))
        assert [_sha256(b) for b in bodies] == [nodes.local_layer] * len(reads) + [
            nodes.remote_layer
        ] * len(held)


async def test_the_local_containerd_has_a_node_wide_budget(joined: Nodes) -> None:
    nodes = joined
    layer = f"library/remote/blobs/{nodes.remote_layer}"
    containerd = Client(nodes.a.registry_http, CONTAINERD)
    try:
        # Parallel pulls of the node's own containerd go past the per-client cap ...
        held = await _hold_relays(containerd, nodes, MAX_LOCAL)
        assert _in_flight(nodes) == MAX_LOCAL
        # ... up to the node-wide budget.
        _refused(await containerd.request(layer), "max_local_relays", MAX_LOCAL)
        bodies = await asyncio.gather(*(answer.body() for answer in held))
        assert [_sha256(body) for body in bodies] == [nodes.remote_layer] * MAX_LOCAL
        await wait_until(lambda: _in_flight(nodes) == 0, within=WAIT_S)
    finally:
        containerd.close()
