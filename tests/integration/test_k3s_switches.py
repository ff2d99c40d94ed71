"""Each service, run as a process, honours the switches of a K3s config.yaml: with
`embedded-registry: false` it starts, takes no part and says so; `peermirror health` probes it."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.harness.service_procs import (
    NodePorts,
    ServiceProcess,
    cli_argv,
    http_get,
    running,
    wait_http_ok,
    wait_serving,
    write_node_config,
)

NOWHERE = "http://127.0.0.1:9"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def node(tmp_path: Path) -> tuple[NodePorts, Path]:
    """A node whose K3s config (with a drop-in) turns the mirror off and the default endpoint
    off, and which mirrors docker.io: only the switches keep it out."""
    ports = NodePorts.pick()
    config = write_node_config(tmp_path, ports)
    k3s_config = tmp_path / "k3s" / "config.yaml"
    (k3s_config.parent / "config.yaml.d").mkdir(parents=True)
    k3s_config.write_text("embedded-registry: true\ntoken: not-read\n", encoding="utf-8")
    (k3s_config.parent / "config.yaml.d" / "50-peermirror.yaml").write_text(
        "embedded-registry: false\ndisable-default-registry-endpoint: true\n", encoding="utf-8"
    )
    registries = tmp_path / "registries.yaml"
    registries.write_text(f"mirrors:\n  docker.io:\n    endpoint: [{NOWHERE}]\n", encoding="utf-8")
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["node"]["k3s_config"] = str(k3s_config)
    data["registry"]["registries_file"] = str(registries)
    # The switches are under test here, not the node certificates.
    data["tls"] = {"enabled": False}
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    return ports, config


def warnings_about_taking_no_part(proc: ServiceProcess) -> list[dict[str, object]]:
    return [
        r
        for r in proc.json_lines()
        if r.get("level") == "warning" and "takes no part" in str(r.get("event"))
    ]


def health_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv("health", *args), capture_output=True, text=True, timeout=30, check=False
    )


def test_registry_answers_404_to_every_mirror_request(
    node: tuple[NodePorts, Path], tmp_path: Path
) -> None:
    ports, config = node
    argv = cli_argv("registry", "--config", str(config))
    with running(argv, tmp_path / "logs", "registry") as proc:
        wait_serving(ports.grpc_address("registry"), proc)
        assert json.loads(wait_http_ok(f"{ports.registry_url}/readyz")) == {"status": "ready"}
        for path in (
            "/v2/library/alpine/manifests/3.20?ns=docker.io",
            f"/v2/library/alpine/manifests/{DIGEST}?ns=docker.io",
            f"/v2/library/alpine/blobs/{DIGEST}?ns=docker.io",
        ):
            status, body = http_get(ports.registry_url + path)
            assert status == 404, path
            (error,) = json.loads(body)["errors"]
            assert error["code"] == "NAME_UNKNOWN"
            assert "takes no part" in error["message"]
        assert proc.terminate() == 0
        assert len(warnings_about_taking_no_part(proc)) == 1


def test_discovery_opens_no_peer_port(node: tuple[NodePorts, Path], tmp_path: Path) -> None:
    ports, config = node
    argv = cli_argv("discovery", "--config", str(config))
    with running(argv, tmp_path / "logs", "discovery") as proc:
        wait_serving(ports.grpc_address("discovery"), proc)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports.discovery_peer), timeout=2).close()
        probe = health_cli("discovery", "--config", str(config))
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.strip() == f"{ports.grpc_address('discovery')}: SERVING"
        assert proc.terminate() == 0
        assert len(warnings_about_taking_no_part(proc)) == 1


def test_pinner_advertises_nothing_and_writes_hosts_without_the_mirror(
    node: tuple[NodePorts, Path], tmp_path: Path
) -> None:
    ports, config = node
    argv = cli_argv("pinner", "--config", str(config))
    with running(argv, tmp_path / "logs", "pinner") as proc:
        # Discovery is not running: a pinner that tried to advertise would never get ready.
        wait_serving(ports.grpc_address("pinner"), proc)
        probe = health_cli("pinner", "--live", "--config", str(config))
        assert probe.returncode == 0, probe.stderr
        assert proc.terminate() == 0
        assert len(warnings_about_taking_no_part(proc)) == 1
    hosts = (tmp_path / "certs.d" / "docker.io" / "hosts.toml").read_text(encoding="utf-8")
    assert f"127.0.0.1:{ports.registry_http}" not in hosts
    assert NOWHERE in hosts
    # disable-default-registry-endpoint: no upstream `server` for the mirrored registry.
    assert "registry-1.docker.io" not in hosts


def test_health_fails_where_nothing_answers(tmp_path: Path) -> None:
    ports = NodePorts.pick()
    for extra in ([], ["--live"]):
        probe = health_cli("--address", ports.grpc_address("pinner"), "--timeout", "1", *extra)
        assert probe.returncode == 1
        assert "UNREACHABLE" in probe.stdout
    usage = health_cli()
    assert usage.returncode == 2
