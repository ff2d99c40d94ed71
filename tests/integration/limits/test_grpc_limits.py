"""Configured gRPC limits on a real discovery process: lowered limits are enforced with a status
naming the field, and refusals are logged once per client and limit (rate limited).

Two clients need two source addresses, and a gRPC client cannot choose its own: the node listens
on every address (``[::]``), so a caller over 127.0.0.1 and one over ::1 are different clients.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from services.common.genproto.peermirror.discovery.v1 import local_pb2 as lpb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as lpb_grpc
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as ppb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as ppb_grpc
from services.common.tls import TlsFiles
from tests.harness.service_procs import (
    NodePorts,
    ServiceProcess,
    cli_argv,
    running,
    wait_serving,
    write_node_config,
)
from tests.harness.wait import wait_until
from tests.integration.security import conftest as security
from tests.integration.security.nodes import credentials_of, sender

# The security tests' cluster PKI (node, and a rogue certificate naming another address).
cluster = security.cluster

MAX_KEYS = 3
MAX_PEER_KEYS = 2
MAX_KEY_LENGTH = 16
MAX_MESSAGE_BYTES = 4096
# Refusals sent by the first client; all but the first are suppressed in the log.
REPEATS = 6
FIRST, SECOND = "127.0.0.1", "::1"
RPC_TIMEOUT = 5.0
LOG_WAIT_S = 20.0

pytestmark = pytest.mark.slow


def _dial(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Node:
    """One discovery process listening on every address, and its refusal log lines."""

    def __init__(self, ports: NodePorts, proc: ServiceProcess) -> None:
        self.ports = ports
        self.proc = proc

    def local(self, client: str) -> str:
        """The node-local API as `client` dials it."""
        return _dial(client, self.ports.discovery_local)

    def peer(self, client: str) -> str:
        """The peer port as `client` dials it."""
        return _dial(client, self.ports.discovery_peer)

    def refusals(self, limit: str) -> list[dict[str, Any]]:
        """Log lines naming a client refused for `limit`."""
        found = []
        for text in self.proc.output_lines():
            with contextlib.suppress(ValueError):
                line = json.loads(text)
                if isinstance(line, dict) and line.get("limit") == limit:
                    found.append(line)
        return found

    def errors(self) -> list[str]:
        """Lines logged at error level (a refusal must not cause any)."""
        return [text for text in self.proc.output_lines() if '"level": "error"' in text]

    async def wait_logged(self, limit: str, client: str) -> list[dict[str, Any]]:
        """The refusal lines of `limit` once one names `client` (written as the call is
        refused, or just after when grpc refused it first)."""
        await wait_until(
            lambda: any(line["client"] == client for line in self.refusals(limit)), LOG_WAIT_S
        )
        return self.refusals(limit)


@contextlib.contextmanager
def discovery_node(directory: Path, tls: TlsFiles | None = None) -> Iterator[Node]:
    """A discovery process with lowered limits on [::]; mutual TLS when `tls` is given."""
    ports = NodePorts.pick()
    path = write_node_config(directory, ports)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["discovery"].update(
        host="::",
        local_address=f"[::]:{ports.discovery_local}",
        max_keys_per_advertise=MAX_KEYS,
        max_keys_per_peer_call=MAX_PEER_KEYS,
        max_key_length=MAX_KEY_LENGTH,
    )
    data["grpc"] = {"max_message_bytes": MAX_MESSAGE_BYTES}
    if tls is not None:
        data["tls"] = {
            "enabled": True,
            "ca_file": str(tls.ca_file),
            "cert_file": str(tls.cert_file),
            "key_file": str(tls.key_file),
        }
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with running(cli_argv("discovery", "--config", str(path)), directory, "discovery") as proc:
        wait_serving(ports.grpc_address("discovery"), proc)
        yield Node(ports, proc)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with discovery_node(tmp_path_factory.mktemp("grpc-limits")) as running_node:
        yield running_node


async def refused(call: Awaitable[object], code: grpc.StatusCode, details: str) -> None:
    """`call` fails with `code` and details starting with `details`."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code
    assert (err.value.details() or "").startswith(details), err.value.details()


async def refused_once_per_client(
    node: Node,
    limit: str,
    address: Callable[[str], str],
    call: Callable[[grpc.aio.Channel], Awaitable[object]],
    code: grpc.StatusCode,
    details: str,
    channel: Callable[[str], grpc.aio.Channel] = grpc.aio.insecure_channel,
) -> list[dict[str, Any]]:
    """`call(channel)` REPEATS times from the first client, then once from the second, each
    refused with `code` and `details` (its ``{client}`` filled in); the refusal lines of `limit`
    once there is one per client (and no more)."""
    for client, times in ((FIRST, REPEATS), (SECOND, 1)):
        async with channel(address(client)) as opened:
            for _ in range(times):
                await refused(call(opened), code, details.format(client=client))
    # The second client called only once the first had every answer, so by the time its line
    # is written every refusal of the first was handled: the count below is final.
    lines = await node.wait_logged(limit, SECOND)
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["client"]] = counts.get(line["client"], 0) + 1
    assert counts == {FIRST: 1, SECOND: 1}
    assert all(line["level"] == "warning" for line in lines)
    return lines


async def _first_answer(channel: grpc.aio.Channel, request: lpb.FindProvidersRequest) -> None:
    async for _ in lpb_grpc.LocalDiscoveryStub(channel).FindProviders(request, timeout=RPC_TIMEOUT):
        break


TOO_MANY_KEYS = lpb.AdvertiseRequest(keys=[f"sha256:{i}" for i in range(MAX_KEYS + 1)])
TOO_LONG_KEY = lpb.FindProvidersRequest(key="k" * (MAX_KEY_LENGTH + 1))
# Refused by grpc itself before anything is parsed, whatever the message holds.
TOO_LARGE = lpb.AdvertiseRequest(keys=["x" * MAX_MESSAGE_BYTES])
TOO_MANY_PEER_KEYS = ppb.AddProviderRequest(
    sender=sender(os.urandom(32)), keys=[os.urandom(32) for _ in range(MAX_PEER_KEYS + 1)]
)


@dataclass(frozen=True)
class Case:
    """A call over one limit: the listener it goes to, the refusal, what its log line holds."""

    limit: str
    listener: str  # "local" or "peer"
    call: Callable[[grpc.aio.Channel], Awaitable[object]]
    code: grpc.StatusCode
    details: str
    logged: dict[str, object]


CASES = [
    Case(
        "max_keys_per_advertise",
        "local",
        lambda channel: lpb_grpc.LocalDiscoveryStub(channel).Advertise(
            TOO_MANY_KEYS, timeout=RPC_TIMEOUT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"keys: at most {MAX_KEYS} keys per call, got {MAX_KEYS + 1}",
        {"max": MAX_KEYS, "field": "keys"},
    ),
    Case(
        "max_key_length",
        "local",
        lambda channel: _first_answer(channel, TOO_LONG_KEY),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"key: longer than {MAX_KEY_LENGTH} characters",
        {"max": MAX_KEY_LENGTH, "field": "key"},
    ),
    Case(
        "max_message_bytes",
        "local",
        lambda channel: lpb_grpc.LocalDiscoveryStub(channel).Advertise(
            TOO_LARGE, timeout=RPC_TIMEOUT
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"SERVER: Received message larger than max ({TOO_LARGE.ByteSize()} vs. "
        f"{MAX_MESSAGE_BYTES})",
        {
            "max": MAX_MESSAGE_BYTES,
            "server": "discovery-local",
            "method": "/peermirror.discovery.v1.LocalDiscovery/Advertise",
        },
    ),
    Case(
        "max_keys_per_peer_call",
        "peer",
        lambda channel: ppb_grpc.PeerStub(channel).AddProvider(
            TOO_MANY_PEER_KEYS, timeout=RPC_TIMEOUT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"keys: at most {MAX_PEER_KEYS} keys per call, got {MAX_PEER_KEYS + 1}",
        {"max": MAX_PEER_KEYS, "keys": MAX_PEER_KEYS + 1},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.limit)
async def test_a_lowered_limit_is_enforced_and_logged_once_per_client(
    node: Node, case: Case
) -> None:
    address = node.local if case.listener == "local" else node.peer
    lines = await refused_once_per_client(
        node, case.limit, address, case.call, case.code, case.details
    )
    for key, value in case.logged.items():
        assert [line[key] for line in lines] == [value, value]
    assert node.errors() == []


async def test_within_the_limits_the_node_answers(node: Node) -> None:
    async with grpc.aio.insecure_channel(node.local(FIRST)) as channel:
        stub = lpb_grpc.LocalDiscoveryStub(channel)
        at_limit = lpb.AdvertiseRequest(keys=TOO_MANY_KEYS.keys[:MAX_KEYS])
        reply = await stub.Advertise(at_limit, timeout=RPC_TIMEOUT)
        assert reply.total >= MAX_KEYS
        providers = lpb.FindProvidersRequest(key="k" * MAX_KEY_LENGTH, limit=1)
        assert [p async for p in stub.FindProviders(providers, timeout=RPC_TIMEOUT)] == []
        assert (await stub.Stats(lpb.StatsRequest(), timeout=RPC_TIMEOUT)).node_id


async def test_identity_binding_refusals_are_rate_limited(
    tmp_path: Path, cluster: security.ClusterPki
) -> None:
    # The rogue certificate names another address than the one it calls from (either client).
    credentials = credentials_of(cluster.rogue)
    request = ppb.PingRequest(sender=sender(os.urandom(32)))

    def rogue_channel(address: str) -> grpc.aio.Channel:
        # The node's certificate names 127.0.0.1; ::1 reaches the same listener.
        options = (("grpc.ssl_target_name_override", FIRST),)
        return grpc.aio.secure_channel(address, credentials, options)

    with discovery_node(tmp_path, tls=cluster.node) as tls_node:
        lines = await refused_once_per_client(
            tls_node,
            "identity_binding",
            tls_node.peer,
            lambda channel: ppb_grpc.PeerStub(channel).Ping(request, timeout=RPC_TIMEOUT),
            grpc.StatusCode.PERMISSION_DENIED,
            f"the caller's certificate names ['{security.OTHER_IP}'], "
            "not the address {client} it calls from",
            rogue_channel,
        )
    assert all(line["certificate_ips"] == [security.OTHER_IP] for line in lines)
