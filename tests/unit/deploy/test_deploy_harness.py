"""The pure parts of the deploy tests' harness: pod manifests to OCI specs, the compose override,
apt sources to a debootstrap mirror."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import load_config
from tests.integration.deploy.compose_override import (
    NOWHERE,
    NodePorts,
    node_environment,
    override_data,
    registries_yaml,
)
from tests.integration.deploy.debian_base import (
    AptSource,
    BaseImageError,
    cache_key,
    debian_mirror,
    parse_deb822_sources,
    parse_one_line_sources,
)
from tests.integration.deploy.podspec import (
    PodSpecError,
    containers,
    image_reference,
    oci_spec,
    process_args,
    quantity,
)

REPO = Path(__file__).resolve().parents[3]
K3S = REPO / "deploy" / "k3s"
DEFAULT_SPEC: dict[str, Any] = {
    "process": {
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "cwd": "/",
        "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_CHOWN"]},
        "noNewPrivileges": False,
    },
    "root": {"path": "rootfs"},
    "hostname": "box",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "linux": {
        "cgroupsPath": "/default",
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
    },
}
IMAGE_CONFIG = {
    "Entrypoint": ["peermirror"],
    "Cmd": ["--help"],
    "Env": ["PATH=/opt/peermirror/bin:/usr/bin"],
    "WorkingDir": "/var/lib/peermirror",
    "User": "65532:65532",
}


def pod(name: str) -> dict[str, Any]:
    data = yaml.safe_load((K3S / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def spec_for(name: str) -> dict[str, Any]:
    (container,) = containers(pod(name))
    return oci_spec(
        DEFAULT_SPEC,
        container,
        image_config=IMAGE_CONFIG,
        rootfs="/mnt/rootfs",
        cgroups_path="/pods/x",
        netns_path="/var/run/netns/node",
        host_path=lambda v: f"/host{v.host_path}",
    )


def test_pinner_manifest_becomes_the_spec_kubelet_would_run() -> None:
    spec = spec_for("pinner.yaml")
    process = spec["process"]
    assert process["args"] == ["peermirror", "pinner", "--config", "/etc/peermirror/node.yaml"]
    assert process["user"] == {"uid": 0, "gid": 0}
    assert all(caps == [] for caps in process["capabilities"].values())
    assert process["noNewPrivileges"] is True
    assert process["env"] == IMAGE_CONFIG["Env"] and process["cwd"] == "/var/lib/peermirror"
    assert spec["root"] == {"path": "/mnt/rootfs", "readonly": True}
    namespaces = spec["linux"]["namespaces"]
    assert {"type": "network", "path": "/var/run/netns/node"} in namespaces
    assert not any(ns["type"] == "uts" for ns in namespaces) and "hostname" not in spec
    assert spec["linux"]["resources"]["memory"] == {"limit": 384 << 20}
    assert containers(pod("pinner.yaml"))[0].grace_period == 10
    mounts = {m["destination"]: m for m in spec["mounts"]}
    socket = mounts["/run/k3s/containerd/containerd.sock"]
    assert socket["source"] == "/host/run/k3s/containerd/containerd.sock"
    assert socket["options"] == ["rbind", "rw"]
    assert mounts["/var/lib/peermirror/tls"]["options"] == ["rbind", "ro"]
    assert mounts["/tmp"]["type"] == "tmpfs" and f"size={16 << 20}" in mounts["/tmp"]["options"]
    # The default spec given in is left as it was.
    assert DEFAULT_SPEC["hostname"] == "box" and len(DEFAULT_SPEC["mounts"]) == 1


def test_every_manifest_container_has_exec_probes() -> None:
    for name in ("discovery.yaml", "registry.yaml", "registry-server.yaml", "pinner.yaml"):
        (container,) = containers(pod(name))
        assert container.readiness is not None and container.readiness[:2] == (
            "peermirror",
            "health",
        )
        assert container.liveness is not None and "--live" in container.liveness


def test_kubernetes_command_and_args_rules() -> None:
    (container,) = containers(pod("discovery.yaml"))
    assert process_args(container, ["peermirror"], ["--help"])[1] == "discovery"
    replaced = containers(
        {
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "command": ["sh"]}]},
        }
    )[0]
    assert process_args(replaced, ["peermirror"], ["--help"]) == ["sh"]


@pytest.mark.parametrize(
    ("pod_data", "message"),
    [
        ({"kind": "Deployment"}, "not a Pod"),
        (
            {
                "kind": "Pod",
                "metadata": {"name": "p"},
                "spec": {"volumes": [{"name": "v", "configMap": {"name": "x"}}], "containers": []},
            },
            "only hostPath and emptyDir",
        ),
        (
            {
                "kind": "Pod",
                "metadata": {"name": "p"},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "i",
                            "volumeMounts": [{"name": "x", "mountPath": "/"}],
                        }
                    ]
                },
            },
            "undeclared volume 'x'",
        ),
    ],
)
def test_unsupported_manifests_are_refused_by_name(pod_data: dict[str, Any], message: str) -> None:
    with pytest.raises(PodSpecError, match=message):
        containers(pod_data)


def test_quantities_and_image_references() -> None:
    assert quantity("128Mi") == 128 << 20 and quantity("1G") == 10**9 and quantity(5) == 5
    with pytest.raises(PodSpecError):
        quantity("1.5Gi")
    assert image_reference("peermirror:0.1.0") == "docker.io/library/peermirror:0.1.0"
    assert image_reference("rancher/k3s:v1") == "docker.io/rancher/k3s:v1"
    assert image_reference("registry.test:5000/a/b:1") == "registry.test:5000/a/b:1"


def test_compose_override_replaces_only_the_shipped_mounts_and_loads(tmp_path: Path) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    ports = NodePorts(15001, 16443, 15002, 15004, 15003, 15005, 15007, 15006)
    env = node_environment(ports, "10.213.0.254", ["10.213.0.1:5001"])
    data = override_data(
        environment=env,
        containerd_socket=Path("/t/ctd.sock"),
        content_root=Path("/t/content"),
        certs_dir=Path("/t/certs.d"),
        registries_file=Path("/t/registries.yaml"),
    )
    for name, service in data["services"].items():
        assert set(service) <= {"environment", "volumes"}
        shipped = {v.split(":")[1]: v for v in compose["services"][name]["volumes"]}
        for volume in service.get("volumes", []):
            target = volume.split(":")[1]
            # Same container path as a shipped volume: compose replaces it, adds nothing.
            assert target in shipped, volume
            assert volume.endswith(":ro") == shipped[target].endswith(":ro"), volume
    cfg = load_config(REPO / "deploy" / "dev" / "compose-node.yaml", env=env)
    assert (cfg.registry.port, cfg.discovery.port) == (16443, 15001)
    assert cfg.discovery.bootstrap_peers == ["10.213.0.1:5001"]
    assert cfg.pinner.disable_default_endpoint is True
    assert registries_yaml(["docker.io"]) == {"mirrors": {"docker.io": {"endpoint": [NOWHERE]}}}


def test_apt_sources_give_the_debian_mirror() -> None:
    deb822 = """Types: deb
URIs: http://deb.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://deb.example/debian-security
Suites: bookworm-security
Components: main
"""
    sources = parse_deb822_sources(deb822)
    assert debian_mirror(reversed(sources)) == "http://deb.example/debian"
    one_line = "# comment\ndeb [arch=amd64] http://m.example/debian/ bookworm main contrib\n"
    assert debian_mirror(parse_one_line_sources(one_line)) == "http://m.example/debian"
    with pytest.raises(BaseImageError, match="bookworm main"):
        debian_mirror([AptSource("http://x", ("bullseye",), ("main",))])


def test_cache_key_changes_with_every_input() -> None:
    key = cache_key("http://a", b"ca")
    assert key == cache_key("http://a", b"ca")
    assert len({key, cache_key("http://b", b"ca"), cache_key("http://a", b"other")}) == 3
