"""docker-compose.yml, deploy/Dockerfile and deploy/k3s checked against the code they run.

Loaded as data here, in milliseconds: every command must parse with the real `peermirror`
argument parser, every config file must pass the real loader, and every port, probe and mount must
agree with the config the container reads. tests/integration/deploy builds the image and runs
docker-compose.yml and the K3s manifests for real.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from services.cli.health_cmd import LOCAL_ADDRESS_KEYS, local_address, registry_url
from services.cli.main import build_parser
from services.common.config import NodeConfig, load_config, parse_host_port
from services.common.k3s.registries import parse_registries
from services.common.tls import tls_files
from services.pinner.hosts_toml import render_hosts_files
from services.pinner.service import hosts_options
from services.registry.health import health

REPO = Path(__file__).resolve().parents[3]
K3S_DIR = REPO / "deploy" / "k3s"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"
CONFIG_IN_CONTAINER = "/etc/peermirror/node.yaml"

# Where K3s keeps what peermirror touches; the config keys naming each.
K3S_PATHS = {
    "store.containerd_address": "/run/k3s/containerd/containerd.sock",
    "store.content_root": "/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content",
    "pinner.images_dir": "/var/lib/rancher/k3s/agent/images",
    "pinner.certs_dir": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
    "registry.registries_file": "/etc/rancher/k3s/registries.yaml",
    "node.k3s_config": "/etc/rancher/k3s/config.yaml",
}
# Taken on K3s nodes: 6443 supervisor and API server (servers), 6444 the agent's supervisor load
# balancer (and the API server's own port on servers), 10250 kubelet.
K3S_SERVER_PORTS = frozenset({6443, 6444, 10250})
K3S_AGENT_PORTS = frozenset({6444, 10250})

# Which node config each K3s manifest runs with, and whether that node is a K3s server.
K3S_MANIFESTS: dict[str, list[tuple[str, bool]]] = {
    "discovery.yaml": [("node.yaml", False), ("node-server.yaml", True)],
    "pinner.yaml": [("node.yaml", False), ("node-server.yaml", True)],
    "registry.yaml": [("node.yaml", False)],
    "registry-server.yaml": [("node-server.yaml", True)],
}

# Config keys naming host paths each service uses, and whether it writes there.
SERVICE_PATHS: dict[str, dict[str, bool]] = {
    "discovery": {"node.data_dir": True},
    "registry": {
        "store.containerd_address": False,
        "store.content_root": False,
        "registry.registries_file": False,
    },
    "pinner": {
        "store.containerd_address": True,
        "store.content_root": False,
        "registry.registries_file": False,
        "pinner.images_dir": False,
        "pinner.certs_dir": True,
        "pinner.ca_file": False,
        "pinner.client_cert_file": False,
        "pinner.client_key_file": False,
    },
}
# Services serving a port to other nodes, over mutual TLS when it is on.
TLS_SERVICES = frozenset({"discovery", "registry"})


def config_value(cfg: NodeConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def node_config(path: Path) -> NodeConfig:
    return load_config(path, env={})


def parse_cli(argv: list[str]) -> Any:
    """The parsed arguments; argparse exits (failing the test) on an unknown command or flag."""
    return build_parser().parse_args(argv)


@dataclass(frozen=True)
class Mount:
    """A path as the container sees it, where it comes from on the host, and its mode."""

    container: str
    host: str
    read_only: bool


def covering(mounts: list[Mount], path: str) -> Mount | None:
    """The mount through which the container reaches `path` (exact or a parent directory)."""
    target = PurePosixPath(path)
    best: Mount | None = None
    for mount in mounts:
        base = PurePosixPath(mount.container)
        if (target == base or base in target.parents) and (
            best is None or len(mount.container) > len(best.container)
        ):
            best = mount
    return best


def assert_paths_mounted(service: str, cfg: NodeConfig, mounts: list[Mount]) -> None:
    for key, writes in SERVICE_PATHS[service].items():
        value = config_value(cfg, key)
        if value is None:
            continue
        path = str(value)
        mount = covering(mounts, path)
        assert mount is not None, f"{service}: {key}={path} is not mounted"
        assert not (writes and mount.read_only), f"{service}: {key}={path} is mounted read-only"
    files = tls_files(cfg)
    if service in TLS_SERVICES and files is not None:
        for tls_path in (files.ca_file, files.cert_file, files.key_file):
            assert covering(mounts, str(tls_path)) is not None, f"{service}: {tls_path} not mounted"
    if cfg.node.k3s_config is not None:
        for k3s_path in (str(cfg.node.k3s_config), f"{cfg.node.k3s_config}.d"):
            assert covering(mounts, k3s_path) is not None, f"{service}: {k3s_path} not mounted"


# --- example node configs -------------------------------------------------------------------


EXAMPLE_CONFIGS = [
    K3S_DIR / "node.yaml",
    K3S_DIR / "node-server.yaml",
    REPO / "deploy" / "dev" / "compose-node.yaml",
]


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_example_configs_load(path: Path) -> None:
    node_config(path)


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS[:3], ids=lambda p: str(p.relative_to(REPO)))
def test_containerd_is_sent_to_the_registry_the_way_it_serves(path: Path) -> None:
    cfg = node_config(path)
    # https with the node's certificate when the registry serves mutual TLS, else http.
    assert cfg.pinner.mirror_tls is cfg.tls.enabled
    files = tls_files(cfg)
    if files is not None:
        assert cfg.pinner.ca_file == files.ca_file
        assert cfg.pinner.client_cert_file == files.cert_file
        assert cfg.pinner.client_key_file == files.key_file


@pytest.mark.parametrize("name", ["node.yaml", "node-server.yaml"])
def test_k3s_configs_use_the_k3s_paths(name: str) -> None:
    cfg = node_config(K3S_DIR / name)
    for key, path in K3S_PATHS.items():
        assert str(config_value(cfg, key)) == path, key
    assert cfg.store.backend == "containerd"
    assert cfg.store.containerd_namespace == "k8s.io"
    # Between K3s nodes: mutual TLS, never plain HTTP.
    assert cfg.tls.enabled is True


def listen_ports(cfg: NodeConfig) -> dict[str, int]:
    ports = {"registry.port": cfg.registry.port, "discovery.port": cfg.discovery.port}
    for service in LOCAL_ADDRESS_KEYS:
        ports[LOCAL_ADDRESS_KEYS[service]] = parse_host_port(local_address(cfg, service))[1]
    return ports


def test_agent_config_keeps_the_k3s_default_ports() -> None:
    cfg = node_config(K3S_DIR / "node.yaml")
    defaults = NodeConfig()
    assert cfg.registry.port == defaults.registry.port == 6443
    assert cfg.discovery.port == defaults.discovery.port == 5001
    taken = {k: p for k, p in listen_ports(cfg).items() if p in K3S_AGENT_PORTS}
    assert not taken, f"ports K3s agents use: {taken}"


def test_server_config_moves_the_registry_off_6443() -> None:
    agent = node_config(K3S_DIR / "node.yaml")
    server = node_config(K3S_DIR / "node-server.yaml")
    assert server.registry.port == 6445
    taken = {k: p for k, p in listen_ports(server).items() if p in K3S_SERVER_PORTS}
    assert not taken, f"ports K3s servers use: {taken}"
    # Apart from the port (and nothing else), a server runs like an agent.
    assert server == dataclasses.replace(
        agent, registry=dataclasses.replace(agent.registry, port=6445)
    )


def test_server_containerd_is_pointed_at_the_moved_port() -> None:
    cfg = node_config(K3S_DIR / "node-server.yaml")
    rendered = render_hosts_files(parse_registries("mirrors:\n  docker.io:\n"), hosts_options(cfg))
    text = "\n".join(rendered.files.values())
    assert '[host."https://127.0.0.1:6445/v2"]' in text
    assert "6443" not in text


def test_default_registry_grpc_address_avoids_k3s_ports() -> None:
    port = parse_host_port(NodeConfig().registry.grpc_address)[1]
    assert port not in K3S_SERVER_PORTS


# --- k3s static pods --------------------------------------------------------------------------


def k3s_mounts(pod: dict[str, Any], container: dict[str, Any]) -> list[Mount]:
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = []
    for vm in container.get("volumeMounts", []):
        volume = volumes[vm["name"]]
        host = volume["hostPath"]["path"] if "hostPath" in volume else ""
        mounts.append(Mount(vm["mountPath"], host, bool(vm.get("readOnly", False))))
    return mounts


def k3s_cases() -> Iterator[tuple[str, str, bool]]:
    for manifest, configs in K3S_MANIFESTS.items():
        for config, server in configs:
            yield manifest, config, server


def test_every_k3s_manifest_is_checked() -> None:
    assert sorted(p.name for p in K3S_DIR.glob("*.yaml") if p.name.startswith("node")) == [
        "node-server.yaml",
        "node.yaml",
    ]
    manifests = sorted(p.name for p in K3S_DIR.glob("*.yaml") if not p.name.startswith("node"))
    assert manifests == sorted(K3S_MANIFESTS)


def pyproject() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize(("manifest", "config", "server"), list(k3s_cases()))
def test_k3s_static_pod(manifest: str, config: str, server: bool) -> None:
    pod = load(K3S_DIR / manifest)
    cfg = node_config(K3S_DIR / config)
    assert pod["kind"] == "Pod"
    spec = pod["spec"]
    assert spec["hostNetwork"] is True
    (container,) = spec["containers"]
    version = pyproject()["project"]["version"]
    assert container["image"] == f"peermirror:{version}"
    assert "command" not in container, "the image's ENTRYPOINT is peermirror"

    args = parse_cli(container["args"])
    service = args.service
    assert service == container["name"]
    assert pod["metadata"]["name"] == f"peermirror-{service}"
    assert str(args.config) == CONFIG_IN_CONTAINER

    mounts = k3s_mounts(pod, container)
    config_mount = covering(mounts, CONFIG_IN_CONTAINER)
    assert config_mount is not None and config_mount.read_only
    # Static pods read the node config from the host: K3s paths are the same inside and out.
    for mount in mounts:
        if mount.host:
            assert mount.host == mount.container, mount
    assert_paths_mounted(service, cfg, mounts)

    limits = container["resources"]["limits"]
    assert {"cpu", "memory"} <= set(limits)
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]

    ports = {p["containerPort"] for p in container.get("ports", [])}
    expected_ports = {"registry": {cfg.registry.port}, "discovery": {cfg.discovery.port}}
    assert ports == expected_ports.get(service, set())
    if server:
        assert not ports & K3S_SERVER_PORTS
    for probe, live in (("readinessProbe", False), ("livenessProbe", True)):
        command = container[probe]["exec"]["command"]
        assert command[0] == "peermirror"
        probe_args = parse_cli(command[1:])
        assert probe_args.handler.__module__ == "services.cli.health_cmd"
        assert probe_args.target == service
        assert probe_args.live is live
        assert str(probe_args.config) == CONFIG_IN_CONTAINER
        if service == "registry":
            assert_registry_probe(cfg, live)


def assert_registry_probe(cfg: NodeConfig, live: bool) -> None:
    """The registry probe asks /livez or /readyz, which the registry serves, on its port."""
    url = registry_url(cfg, live)
    match = re.fullmatch(r"(https?)://127\.0\.0\.1:(\d+)(/\w+)", url)
    assert match is not None, url
    assert match.group(1) == ("https" if cfg.tls.enabled else "http")
    assert int(match.group(2)) == cfg.registry.port
    assert match.group(3) == ("/livez" if live else "/readyz")
    assert match.group(3) in {r.uri for r in health._future_routes}


def test_k3s_registry_manifests_differ_only_in_the_port() -> None:
    agent = (K3S_DIR / "registry.yaml").read_text(encoding="utf-8")
    server = (K3S_DIR / "registry-server.yaml").read_text(encoding="utf-8")
    body = [line for line in agent.splitlines() if not line.startswith("#")]
    server_body = [line for line in server.splitlines() if not line.startswith("#")]
    assert [line.replace("6443", "6445") for line in body] == server_body


def test_k3s_readme_names_every_file() -> None:
    readme = (K3S_DIR / "README.md").read_text(encoding="utf-8")
    for path in K3S_DIR.glob("*.yaml"):
        assert f"`{path.name}`" in readme
    assert "/var/lib/rancher/k3s/agent/pod-manifests/" in readme


# --- docker-compose.yml -----------------------------------------------------------------------


def compose_mounts(service: dict[str, Any]) -> list[Mount]:
    mounts = []
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        mode = parts[2] if len(parts) > 2 else "rw"
        mounts.append(Mount(parts[1], parts[0], "ro" in mode.split(",")))
    return mounts


def compose() -> dict[str, Any]:
    data = load(COMPOSE)
    assert isinstance(data, dict)
    return data


def test_compose_runs_the_three_services_from_one_image() -> None:
    services = compose()["services"]
    assert sorted(services) == ["discovery", "pinner", "registry"]
    version = pyproject()["project"]["version"]
    for name, service in services.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["image"] == f"peermirror:{version}"
        assert service["network_mode"] == "host"
        args = parse_cli(service["command"])
        assert args.service == name


@pytest.mark.parametrize("name", ["discovery", "registry", "pinner"])
def test_compose_service_mounts_and_ports(name: str) -> None:
    service = compose()["services"][name]
    args = parse_cli(service["command"])
    mounts = compose_mounts(service)
    config_mount = covering(mounts, str(args.config))
    assert config_mount is not None and config_mount.read_only
    host_config = REPO / config_mount.host
    cfg = node_config(host_config)
    # Every host path in the config is reachable, at the same path as on the host unless it
    # comes from the repository or a named volume.
    assert_paths_mounted(name, cfg, mounts)
    for mount in mounts:
        if mount.host.startswith("/"):
            assert mount.host == mount.container, mount
    registries = covering(mounts, str(cfg.registry.registries_file))
    if registries is not None and registries.host.startswith("./"):
        parse_registries((REPO / registries.host).read_text(encoding="utf-8"))
    # Defaults apply in compose: a plain (non-K3s) host keeps the standard ports.
    assert cfg.registry.port == NodeConfig().registry.port
    assert cfg.discovery.port == NodeConfig().discovery.port
    if name == "registry":
        socket = covering(mounts, cfg.store.containerd_address)
        assert socket is not None and socket.read_only
        content_root = cfg.store.content_root
        assert content_root is not None
        content = covering(mounts, str(content_root))
        assert content is not None and content.read_only
    # The socket is root-only: only services that call containerd run as root.
    uses_containerd = "store.containerd_address" in SERVICE_PATHS[name]
    assert (service.get("user") == "0:0") is uses_containerd


@pytest.mark.parametrize("name", ["discovery", "registry", "pinner"])
def test_compose_healthchecks_match_the_config(name: str) -> None:
    service = compose()["services"][name]
    cfg = node_config(REPO / compose_mounts(service)[0].host)
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "peermirror"]
    args = parse_cli(test[2:])
    assert args.handler.__module__ == "services.cli.health_cmd"
    assert args.target == name
    assert str(args.config) == CONFIG_IN_CONTAINER
    if name == "registry":
        assert_registry_probe(cfg, args.live)


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_package_and_runs_the_console_script() -> None:
    instructions = dockerfile_instructions()
    # The base is a build argument (tests build from a local Debian); users get python:3.11-slim.
    assert instructions[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    assert any(re.search(r"\bpip install\b", r) for r in runs)
    (entrypoint,) = [rest for kw, rest in instructions if kw == "ENTRYPOINT"]
    scripts = pyproject()["project"]["scripts"]
    assert json.loads(entrypoint) == ["peermirror"]
    assert scripts["peermirror"] == "services.cli.main:main"
    (user,) = [rest for kw, rest in instructions if kw == "USER"]
    assert user.split(":")[0] not in {"0", "root"}
    # What pip installs is what the build context copies in.
    copied = " ".join(rest for kw, rest in instructions if kw == "COPY")
    for needed in ("pyproject.toml", "README.md", "services"):
        assert needed in copied
        # .dockerignore keeps the build context to what is copied (no .venv, no .git).
        assert f"!{needed}" in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    assert DOCKERIGNORE.read_text(encoding="utf-8").splitlines().count("*") == 1
