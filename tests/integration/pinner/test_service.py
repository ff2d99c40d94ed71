"""`peermirror pinner` as a real process: hosts.toml at start, SERVING after the first sync,
advertising through discovery, clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import pytest
import yaml

from services.pinner.hosts_toml import MARKER
from tests.harness.containerd import ContainerdDaemon
from tests.harness.containerd_store_factory import import_image
from tests.harness.fake_discovery import FakeDiscovery
from tests.harness.images import build_image
from tests.harness.service_procs import cli_argv, free_port, health_status, running, wait_serving

pytestmark = pytest.mark.containerd

WAIT_S = 30.0


def write_config(tmp_path: Path, daemon: ContainerdDaemon, namespace: str, disco: str) -> Path:
    registries = tmp_path / "registries.yaml"
    registries.write_text("mirrors:\n  docker.io: {}\n")
    (tmp_path / "images").mkdir()
    data = {
        "node": {"name": "pinner-test", "data_dir": str(tmp_path / "data")},
        "log": {"level": "info", "format": "json"},
        "registry": {"port": 7443, "registries_file": str(registries)},
        "discovery": {"local_address": disco},
        "pinner": {
            "grpc_address": f"127.0.0.1:{free_port()}",
            "images_dir": str(tmp_path / "images"),
            "certs_dir": str(tmp_path / "certs.d"),
            "mirror_tls": False,
            "containerd_flavour": "upstream",
        },
        "store": {"containerd_address": daemon.address, "containerd_namespace": namespace},
    }
    path = tmp_path / "peermirror.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_pinner_process_end_to_end(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    image = build_image(tmp_path / "img", "docker.io/library/svc:1", layers=1, layer_size=1024)
    async with FakeDiscovery() as disco:
        config = write_config(tmp_path, containerd_daemon, containerd_namespace, disco.address)
        grpc_address = yaml.safe_load(config.read_text())["pinner"]["grpc_address"]
        with running(cli_argv("pinner", "--config", str(config)), tmp_path, "pinner") as proc:
            await asyncio.to_thread(wait_serving, grpc_address, proc)
            hosts = tmp_path / "certs.d" / "docker.io" / "hosts.toml"
            text = hosts.read_text()
            assert text.startswith(MARKER)
            assert next(iter(tomllib.loads(text)["host"])) == "http://127.0.0.1:7443/v2"

            await import_image(containerd_daemon, containerd_namespace, image)
            want = {b.digest for b in image.blobs} | {image.name}
            async with asyncio.timeout(WAIT_S):
                await disco.wait_for(lambda keys: keys == want)
            assert health_status(grpc_address) == "SERVING"
            assert await asyncio.to_thread(proc.terminate, 5.0) == 0
        events = [line.get("event") for line in proc.json_lines()]
        assert "first sync done" in events and "pinner stopped" in events
