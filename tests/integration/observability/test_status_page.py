"""The status page in headless Chromium: a registry on loopback with an image in its OCI layout,
its node's discovery in a two-node mesh where the other node advertises the image; after one
pull, the rendered DOM shows the peer, the image row with both nodes, and the pull."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from services.common.config import (
    DiscoverySection,
    NodeConfig,
    NodeSection,
    PinnerSection,
    RegistrySection,
    TlsSection,
)
from services.common.genproto.peermirror.discovery.v1 import local_pb2 as lpb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as lpb_grpc
from services.common.store.oci_layout import OciLayoutStore
from services.registry.app import create_app
from services.registry.service import HttpServer
from tests.harness.chromium import dump_dom
from tests.harness.discovery_mesh import REGISTRY_PORT_BASE, Mesh, find_providers
from tests.harness.images import BuiltImage, build_image
from tests.harness.registry_inproc import write_registries_file
from tests.harness.wait import wait_until

IMAGE = "docker.io/library/statusdemo:1.0"
# Nothing listens on the discard port: the pinner (and the registry's own gRPC) show DOWN.
NOTHING = "127.0.0.1:9"
PEER_REGISTRY = f"127.0.0.1:{REGISTRY_PORT_BASE + 1}"


@dataclass
class Node:
    url: str
    image: BuiltImage


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    layout = tmp_path / "layout"
    image = build_image(layout, name=IMAGE, layers=1, layer_size=64 * 1024, cheap_data=True)
    mesh = Mesh(root=tmp_path / "mesh", discovery={"metrics_address": ""})
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(mesh.close)
        await mesh.grow(2)
        local, other = mesh.nodes
        async with grpc.aio.insecure_channel(other.local_address) as channel:
            await lpb_grpc.LocalDiscoveryStub(channel).Advertise(
                lpb.AdvertiseRequest(keys=[IMAGE]), timeout=10.0
            )

        async def found() -> bool:
            return bool(await find_providers(local.local_address, IMAGE))

        await wait_until(found, within=30.0)
        store = await stack.enter_async_context(OciLayoutStore(layout))
        cfg = NodeConfig(
            node=NodeSection(name="status-node", data_dir=tmp_path / "data"),
            registry=RegistrySection(
                host="127.0.0.1",
                port=0,
                grpc_address=NOTHING,
                metrics_address="",
                registries_file=write_registries_file(tmp_path / "registries.yaml", ["*"]),
                peer_fetch=False,
            ),
            discovery=DiscoverySection(local_address=local.local_address, metrics_address=""),
            pinner=PinnerSection(grpc_address=NOTHING, metrics_address=""),
            tls=TlsSection(enabled=False),
        )
        app = create_app(cfg, name=f"pm_status_{uuid.uuid4().hex[:12]}", store=store)
        http = HttpServer(app, "127.0.0.1", 0)
        await http.start()
        app.ctx.ready = True
        stack.push_async_callback(http.stop)
        yield Node(f"http://127.0.0.1:{http.port}", image)


async def pull_manifest(url: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{url}/v2/library/statusdemo/manifests/1.0",
            params={"ns": "docker.io"},
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        ) as resp,
    ):
        assert resp.status == 200
        await resp.read()


async def test_chromium_renders_peers_images_and_pulls(node: Node) -> None:
    await pull_manifest(node.url)
    dom = await dump_dom(f"{node.url}/status")
    peers = _section(dom, "peers")
    assert PEER_REGISTRY in peers
    images = _section(dom, "images")
    assert IMAGE in images
    # The image row names this node and the peer that advertises it.
    row = next(r for r in images.split("<tr>") if IMAGE in r)
    assert "this node" in row and PEER_REGISTRY in row
    pulls = _section(dom, "pulls")
    assert "docker.io/library/statusdemo:1.0" in pulls and "local" in pulls
    services = _section(dom, "services")
    assert "UP" in services and "DOWN" in services


async def test_status_json_has_the_same_data(node: Node) -> None:
    await pull_manifest(node.url)
    async with aiohttp.ClientSession() as session, session.get(f"{node.url}/status.json") as resp:
        assert resp.status == 200
        doc = json.loads(await resp.text())
    assert doc["schema"] == 1 and doc["node"] == "status-node"
    assert doc["services"]["registry"]["state"] == "UP"
    assert doc["services"]["pinner"]["state"] == "DOWN"
    assert doc["peers"] == 1
    assert [p["registry"] for p in doc["peer_list"]] == [PEER_REGISTRY]
    assert doc["peer_list"][0]["relay"] == "unused"  # nothing was relayed from it
    assert doc["images"] == [
        {"name": IMAGE, "digest": node.image.target.digest, "nodes": ["this node", PEER_REGISTRY]}
    ]
    (pull,) = doc["recent_pulls"]
    assert pull["ref"] == IMAGE and pull["result"] == "hit" and pull["source"] == "local"
    assert pull["bytes"] == node.image.target.size


def _section(dom: str, section_id: str) -> str:
    start = dom.index(f'<section id="{section_id}">')
    return dom[start : dom.index("</section>", start)]
