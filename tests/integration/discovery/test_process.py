"""The discovery service as its own process (`peermirror discovery --config`): restart keeps
the node ID and rejoins; a single node is ready and quiet; an unreachable bootstrap is not ready."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import yaml

from services.common.genproto.peermirror.discovery.v1 import local_pb2 as lpb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as lpb_grpc
from services.discovery.identity import NODE_ID_FILE
from services.discovery.kademlia import dht_key
from tests.harness.discovery_mesh import FAST_PROBING, Mesh, find_providers
from tests.harness.service_procs import (
    NodePorts,
    ServiceProcess,
    cli_argv,
    free_port,
    health_status,
    running,
    wait_serving,
    write_node_config,
)
from tests.harness.wait import wait_until

TIMINGS = FAST_PROBING


def _config(directory: Path, **discovery: object) -> tuple[NodePorts, Path]:
    ports = NodePorts.pick()
    path = write_node_config(directory, ports)
    data = yaml.safe_load(path.read_text())
    data["discovery"].update(discovery)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return ports, path


async def _local(address: str) -> tuple[lpb.StatsResponse, list[str]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = lpb_grpc.LocalDiscoveryStub(channel)
        stats = await stub.Stats(lpb.StatsRequest(), timeout=5.0)
        advertised = [
            k async for r in stub.ListAdvertised(lpb.ListAdvertisedRequest()) for k in r.keys
        ]
        return stats, advertised


async def _advertise(address: str, key: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await lpb_grpc.LocalDiscoveryStub(channel).Advertise(
            lpb.AdvertiseRequest(keys=[key]), timeout=5.0
        )


# The harness config runs without TLS on purpose; the service says so once at start.
PLAIN_MODE_WARNING = "tls.enabled is false"


def _problems(proc: ServiceProcess) -> list[dict[str, object]]:
    return [
        r
        for r in proc.json_lines()
        if r.get("level") in ("warning", "error", "critical")
        and not str(r.get("event")).startswith(PLAIN_MODE_WARNING)
    ]


async def test_restarted_node_keeps_its_id_rejoins_and_its_readvertised_keys_are_found(
    tmp_path: Path,
) -> None:
    mesh = Mesh(tmp_path / "mesh", discovery=dict(TIMINGS))
    try:
        await mesh.grow(3)
        ports, config = _config(tmp_path / "proc", bootstrap_peers=[mesh.bootstrap], **TIMINGS)
        local = ports.grpc_address("discovery")
        key = "sha256:" + dht_key("restarted").hex()
        ids: list[bytes] = []
        for run in (1, 2):
            argv = cli_argv("discovery", "--config", str(config))
            with running(argv, tmp_path / "logs", f"discovery-{run}") as proc:
                await asyncio.to_thread(wait_serving, local, proc)
                stats, advertised = await _local(local)
                node_id = stats.node_id
                ids.append(node_id)
                assert stats.discovery_port == ports.discovery_peer
                # Ready means joined: it knows the mesh and the mesh knows it.
                assert stats.peers >= 1
                await wait_until(
                    lambda: all(node_id in n.engine.node.table for n in mesh.nodes),  # noqa: B023
                    within=10.0,
                )
                # Keys are not kept across restarts: the advertiser (the pinner) diffs
                # ListAdvertised against what it holds and advertises again.
                assert advertised == []
                await _advertise(local, key)

                async def found_everywhere(node_id: bytes = node_id) -> bool:
                    for node in mesh.nodes:
                        answers = await find_providers(node.local_address, key)
                        if not any(
                            r.provider.node_id == node_id
                            and r.provider.discovery_port == ports.discovery_peer
                            and r.provider.registry_port == ports.registry_http
                            for r in answers
                        ):
                            return False
                    return True

                await wait_until(found_everywhere, within=15.0)
                assert await asyncio.to_thread(proc.terminate) == 0
            assert _problems(proc) == []
            if run == 1:
                # Before restarting, let the mesh forget the stopped node, so what is found
                # after the restart can only come from the new announcement.
                async def forgotten() -> bool:
                    for node in mesh.nodes:
                        if await find_providers(node.local_address, key):
                            return False
                    return True

                await wait_until(forgotten, within=15.0)
        assert ids[0] == ids[1]
        id_file = tmp_path / "proc" / "data" / NODE_ID_FILE
        assert id_file.read_text().strip() == ids[0].hex()
    finally:
        await mesh.close()


async def test_single_node_without_peers_is_serving_and_logs_no_problem(tmp_path: Path) -> None:
    ports, config = _config(tmp_path)
    local = ports.grpc_address("discovery")
    with running(cli_argv("discovery", "--config", str(config)), tmp_path / "logs", "d") as proc:
        await asyncio.to_thread(wait_serving, local, proc)
        stats, _advertised = await _local(local)
        assert stats.peers == 0
        await _advertise(local, "sha256:" + "0" * 64)
        assert await find_providers(local, "sha256:" + "0" * 64) == []
        # A few maintenance ticks and publish attempts with nobody to publish to. A fixed pause
        # on purpose: the point is that nothing goes wrong meanwhile, which no condition shows.
        await asyncio.sleep(2.5)
        stats, advertised = await _local(local)
        assert advertised == ["sha256:" + "0" * 64]
        assert (stats.lookups, stats.lookups_empty) == (1, 1)
        assert await asyncio.to_thread(proc.terminate) == 0
    assert _problems(proc) == []
    events = [r["event"] for r in proc.json_lines()]
    assert "discovery ready" in events


async def test_unreachable_bootstrap_is_not_ready_and_warns_once(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    ports, config = _config(tmp_path, bootstrap_peers=[dead])
    local = ports.grpc_address("discovery")
    with running(cli_argv("discovery", "--config", str(config)), tmp_path / "logs", "d") as proc:

        def answering() -> bool:
            try:
                return health_status(local) in ("SERVING", "NOT_SERVING")
            except grpc.RpcError:
                return False

        await wait_until(answering, within=30.0)
        # Several retries happen meanwhile (1 s, 2 s ... backoff); it never turns ready. Polled
        # over a fixed interval on purpose: it must stay NOT_SERVING throughout.
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            assert health_status(local) == "NOT_SERVING"
            await asyncio.sleep(0.25)
        assert await asyncio.to_thread(proc.terminate) == 0
    problems = _problems(proc)
    assert [(r["level"], r["event"]) for r in problems] == [
        ("warning", "bootstrap found no peer yet")
    ]
    assert dead in str(problems[0]["problem"])
