"""Fuzzes every gRPC method of the three services: client-error codes only, no crash, RSS bounded.

The node runs with the OCI-layout store and no containerd, so the pinner serves its
containerd-less API (UNIMPLEMENTED / FAILED_PRECONDITION answers); the containerd-backed pinner
API is not fuzzed here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from hypothesis import given
from hypothesis import strategies as st

from services.common.genproto.peermirror.discovery.v1 import local_pb2, peer_pb2
from services.common.genproto.peermirror.pinner.v1 import pinner_pb2
from services.common.genproto.peermirror.registry.v1 import introspection_pb2
from tests.fuzz.grpc_calls import call_batch
from tests.fuzz.proto_strategies import wire_requests
from tests.fuzz.runs import fuzz_settings
from tests.harness.fuzz_node import FuzzNode, fuzz_node

CASES_PER_METHOD = 1000
# Requests per generated example, sent concurrently: also makes the servers interleave them.
BATCH = 10
RSS_GROWTH_LIMIT = 64 * 1024 * 1024
CALL_TIMEOUT_S = 10.0

CLIENT_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
}

SERVICES: list[tuple[str, str, ServiceDescriptor]] = [
    ("discovery", "peer", peer_pb2.DESCRIPTOR.services_by_name["Peer"]),
    ("discovery", "local", local_pb2.DESCRIPTOR.services_by_name["LocalDiscovery"]),
    ("pinner", "local", pinner_pb2.DESCRIPTOR.services_by_name["Pinner"]),
    ("registry", "local", introspection_pb2.DESCRIPTOR.services_by_name["RegistryIntrospection"]),
]
METHODS: list[tuple[str, str, MethodDescriptor]] = [
    (process, listener, method)
    for process, listener, service in SERVICES
    for method in service.methods
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    directory: Path = tmp_path_factory.mktemp("grpc-fuzz")
    with fuzz_node(directory, services=("discovery", "pinner", "registry")) as running:
        yield running


@pytest.fixture(scope="module")
def baseline(node: FuzzNode) -> dict[str, int]:
    return {service: node.rss(service) for service in node.procs}


def _address(node: FuzzNode, process: str, listener: str) -> str:
    if listener == "peer":
        return f"127.0.0.1:{node.ports.discovery_peer}"
    return node.ports.grpc_address(process)


@pytest.mark.parametrize(
    ("process", "listener", "method"),
    METHODS,
    ids=[f"{m.containing_service.name}.{m.name}" for _, _, m in METHODS],
)
def test_grpc_method_fuzz(
    node: FuzzNode, baseline: dict[str, int], process: str, listener: str, method: MethodDescriptor
) -> None:
    allowed = CLIENT_ERRORS
    codes: Counter[str] = Counter()
    with grpc.insecure_channel(_address(node, process, listener)) as channel:

        @fuzz_settings(CASES_PER_METHOD // BATCH)
        @given(requests=st.lists(wire_requests(method.input_type), min_size=BATCH, max_size=BATCH))
        def run(requests: list[bytes]) -> None:
            outcomes = call_batch(channel, method, requests, CALL_TIMEOUT_S)
            for request, outcome in zip(requests, outcomes, strict=True):
                code = outcome.code
                codes[code.name] += 1
                assert code in allowed, (code, request)

        run()
    print(f"{method.containing_service.name}.{method.name}: {dict(codes)}")
    assert sum(codes.values()) >= CASES_PER_METHOD
    for service in node.procs:
        assert node.alive(service), service
    growth = node.rss(process) - baseline[process]
    print(f"  {process} RSS {node.rss(process) / 2**20:.1f} MiB (+{growth / 2**20:.1f} MiB)")
    assert growth < RSS_GROWTH_LIMIT
