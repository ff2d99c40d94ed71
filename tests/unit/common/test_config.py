"""Typed node config: YAML + env overrides, and errors that name the key and the source."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from services.common.config import (
    ConfigError,
    NodeConfig,
    describe_config,
    dump_config,
    load_config,
    parse_host_port,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config reads os.environ by default; keep the runner's own overrides out."""
    for var in list(os.environ):
        if var.startswith("PEERMIRROR_"):
            monkeypatch.delenv(var)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_defaults_suit_a_k3s_node() -> None:
    cfg = load_config(None)
    assert cfg.node.name == socket.gethostname()
    assert cfg.registry.port == 6443
    assert cfg.discovery.port == 5001
    assert cfg.registry.registries_file == Path("/etc/rancher/k3s/registries.yaml")
    assert cfg.store.backend == "containerd"
    assert cfg.store.containerd_address == "/run/k3s/containerd/containerd.sock"
    assert cfg.store.containerd_namespace == "k8s.io"
    assert cfg.registry.allow_latest is False
    assert cfg.registry.default_registry is None
    assert cfg.log.format == "json"


def test_yaml_values_are_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
node: {name: n1, data_dir: /srv/pm, k3s_config: /etc/rancher/k3s/config.yaml}
log: {level: debug, format: console}
registry:
  port: 7443
  allow_latest: true
  filters: ["^docker\\\\.io/", "ghcr\\\\.io/.*"]
  resolve_timeout: 1
  default_registry: docker.io
discovery:
  bootstrap_peers: [10.0.0.1:5001, 10.0.0.2:5001]
store: {backend: oci-layout, content_root: null}
""",
    )
    cfg = load_config(path)
    assert cfg.node.name == "n1"
    assert cfg.node.data_dir == Path("/srv/pm")
    assert cfg.node.k3s_config == Path("/etc/rancher/k3s/config.yaml")
    assert cfg.log.level == "debug"
    assert cfg.registry.port == 7443
    assert cfg.registry.allow_latest is True
    assert cfg.registry.filters == ["^docker\\.io/", "ghcr\\.io/.*"]
    # An int where a float is expected is accepted and converted.
    assert cfg.registry.resolve_timeout == 1.0
    assert isinstance(cfg.registry.resolve_timeout, float)
    assert cfg.registry.default_registry == "docker.io"
    assert cfg.discovery.bootstrap_peers == ["10.0.0.1:5001", "10.0.0.2:5001"]
    assert cfg.store.backend == "oci-layout"
    assert cfg.store.content_root is None
    # Keys not in the file keep their defaults.
    assert cfg.discovery.port == 5001


def test_empty_file_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == load_config(None)
    assert load_config(write(tmp_path, "registry:\n")).registry == load_config(None).registry


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "registry:\n  port: abc\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: registry.port: expected int, got str 'abc'"


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "registry:\n  prot: 7443\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: unknown key 'registry.prot'"


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "registy: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'registy'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("registry: {allow_latest: 'yes'}", "registry.allow_latest: expected bool, got str 'yes'"),
        ("registry: {port: true}", "registry.port: expected int, got bool True"),
        ("registry: {port: 70000}", "registry.port: port out of range 0-65535: 70000"),
        ("registry: {resolve_timeout: fast}", "registry.resolve_timeout: expected float"),
        ("registry: {resolve_timeout: 0}", "registry.resolve_timeout: must be > 0"),
        ("registry: {filters: a}", "registry.filters: expected list[str], got str 'a'"),
        ("registry: {filters: [a, 3]}", "registry.filters: item 1: expected str, got int 3"),
        ("registry: {grpc_address: nowhere}", "registry.grpc_address: expected host:port"),
        ("log: {level: loud}", "log.level: expected one of 'debug', 'info', 'warning', 'error'"),
        ("store: {backend: redis}", "store.backend: expected one of 'containerd', 'oci-layout'"),
        ("node: {name: 12}", "node.name: expected str, got int 12"),
        ("node: {data_dir: 5}", "node.data_dir: expected path, got int 5"),
        ("registry: 5", "registry: expected a mapping, got int 5"),
    ],
)
def test_type_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_unix_grpc_addresses_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "pinner: {grpc_address: 'unix:/run/pm/pinner.sock'}\n"))
    assert cfg.pinner.grpc_address == "unix:/run/pm/pinner.sock"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: config file not found"


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "registry:\n  port: 1\n  filters: [a, b\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:")
    assert "YAML syntax error" in message
    line = int(message.split(":")[1])
    assert line >= 3


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: top level: expected a mapping, got list ['a', 'b']"


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "registry: {port: 7000}\n")
    cfg = load_config(
        path,
        env={
            "PEERMIRROR_REGISTRY__PORT": "7443",
            "PEERMIRROR_REGISTRY__ALLOW_LATEST": "yes",
            "PEERMIRROR_REGISTRY__FILTERS": "a, b ,,c",
            "PEERMIRROR_DISCOVERY__RECORD_TTL": "660.5",
            "PEERMIRROR_STORE__BACKEND": "oci-layout",
            "PEERMIRROR_STORE__CONTENT_ROOT": "/var/lib/ctd/content",
            "PEERMIRROR_NODE__DATA_DIR": "/srv/pm",
            "PEERMIRROR_LOG__LEVEL": "warning",
            # Not overrides: no double underscore, or another prefix.
            "PEERMIRROR_CONFIG": "/etc/peermirror/node.yaml",
            "HOME": "/root",
        },
    )
    assert cfg.registry.port == 7443
    assert cfg.registry.allow_latest is True
    assert cfg.registry.filters == ["a", "b", "c"]
    assert cfg.discovery.record_ttl == 660.5
    assert cfg.store.backend == "oci-layout"
    assert cfg.store.content_root == Path("/var/lib/ctd/content")
    assert cfg.node.data_dir == Path("/srv/pm")
    assert cfg.log.level == "warning"


def test_process_environment_is_read_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEERMIRROR_REGISTRY__PORT", "7443")
    assert load_config(None).registry.port == 7443
    assert load_config(write(tmp_path, "registry: {port: 1}\n")).registry.port == 7443
    # An explicit mapping replaces the process environment.
    assert load_config(None, env={}).registry.port == 6443


@pytest.mark.parametrize("text", ["true", "1", "yes", "TRUE", "Yes"])
def test_env_bool_true(text: str) -> None:
    cfg = load_config(None, env={"PEERMIRROR_REGISTRY__ALLOW_LATEST": text})
    assert cfg.registry.allow_latest is True


@pytest.mark.parametrize("text", ["false", "0", "no", "NO"])
def test_env_bool_false(text: str) -> None:
    base = load_config(None, env={"PEERMIRROR_REGISTRY__ALLOW_LATEST": "true"})
    assert base.registry.allow_latest is True
    cfg = load_config(None, env={"PEERMIRROR_REGISTRY__ALLOW_LATEST": text})
    assert cfg.registry.allow_latest is False


def test_env_empty_value_clears_optional(tmp_path: Path) -> None:
    path = write(tmp_path, "registry: {default_registry: docker.io}\n")
    cfg = load_config(path, env={"PEERMIRROR_REGISTRY__DEFAULT_REGISTRY": ""})
    assert cfg.registry.default_registry is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PEERMIRROR_REGISTRY__PORT": "abc"},
            "environment PEERMIRROR_REGISTRY__PORT: expected int, got 'abc'",
        ),
        (
            {"PEERMIRROR_REGISTRY__ALLOW_LATEST": "maybe"},
            "environment PEERMIRROR_REGISTRY__ALLOW_LATEST: expected bool",
        ),
        (
            {"PEERMIRROR_REGISTRY__PROT": "1"},
            "environment PEERMIRROR_REGISTRY__PROT: unknown key 'registry.prot'",
        ),
        (
            {"PEERMIRROR_REGISTY__PORT": "1"},
            "environment PEERMIRROR_REGISTY__PORT: unknown key 'registy.port'",
        ),
        (
            {"PEERMIRROR_REGISTRY__PORT__X": "1"},
            "environment PEERMIRROR_REGISTRY__PORT__X: unknown key 'registry.port.x'",
        ),
        (
            {"PEERMIRROR_REGISTRY__": "1"},
            "environment PEERMIRROR_REGISTRY__: unknown key 'registry.'",
        ),
        (
            {"PEERMIRROR_LOG__FORMAT": "xml"},
            "environment PEERMIRROR_LOG__FORMAT: expected one of 'json', 'console'",
        ),
        (
            {"PEERMIRROR_DISCOVERY__PORT": "-1"},
            "environment PEERMIRROR_DISCOVERY__PORT: port out of range",
        ),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env=env)
    assert str(err.value).startswith(message)


def test_dump_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        env={
            "PEERMIRROR_NODE__K3S_CONFIG": "/etc/rancher/k3s/config.yaml",
            "PEERMIRROR_DISCOVERY__BOOTSTRAP_PEERS": "10.0.0.1:5001,10.0.0.2:5001",
            "PEERMIRROR_REGISTRY__DEFAULT_REGISTRY": "docker.io",
        },
    )
    dumped = dump_config(cfg)
    assert dumped["node"]["k3s_config"] == "/etc/rancher/k3s/config.yaml"
    path = write(tmp_path, yaml.safe_dump(dumped))
    assert load_config(path) == cfg


def test_config_is_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.registry.port = 1  # type: ignore[misc]


def test_describe_config_covers_every_leaf() -> None:
    rows = describe_config()
    keys = [r[0] for r in rows]
    dumped = dump_config(NodeConfig())
    leaves = [f"{section}.{key}" for section, values in dumped.items() for key in values]
    assert keys == leaves
    by_key = {r[0]: r for r in rows}
    assert by_key["registry.port"] == ("registry.port", "int", "6443", by_key["registry.port"][3])
    assert by_key["node.name"][2] == "<hostname>"
    assert by_key["store.content_root"][1] == "path | null"
    assert by_key["registry.filters"][2] == "[]"
    assert by_key["log.level"][1] == "'debug' | 'info' | 'warning' | 'error'"
    assert all(doc for _key, _type, _default, doc in rows)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5002", ("127.0.0.1", 5002)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:6443", ("::1", 6443)),
        (":5001", ("", 5001)),
        ("node-1.example:443", ("node-1.example", 443)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["nohost", "a:b", "::1:80", "[::1:80", "h:70000", "h:-1", "h:"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


# --- values and combinations the services refuse at start are refused at load ---------------


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN"])
def test_floats_must_be_finite(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, f"registry:\n  peer_timeout: {text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert f"{path}: registry.peer_timeout: expected a finite float" in str(err.value)


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity"])
def test_env_floats_must_be_finite(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"PEERMIRROR_DISCOVERY__RECORD_TTL": text})
    assert "environment PEERMIRROR_DISCOVERY__RECORD_TTL: expected a finite float" in str(err.value)


# Each case: YAML, then the words the one-line error must hold (keys at fault).
REFUSED_AT_START = {
    "republish_not_shorter_than_ttl": (
        "discovery: {republish_interval: 600, record_ttl: 600}",
        ["discovery.republish_interval", "discovery.record_ttl"],
    ),
    "liveness_window_not_longer_than_probe": (
        "discovery: {probe_interval: 30, liveness_window: 30}",
        ["discovery.liveness_window", "discovery.probe_interval"],
    ),
    "node_address_not_an_ip": ("node: {address: node-1.example}", ["node.address"]),
    "filter_not_a_regex": ("registry: {filters: ['docker.io/(']}", ["registry.filters"]),
    "containerd_version_unparsable": (
        "pinner: {containerd_version: latest}",
        ["pinner.containerd_version"],
    ),
    "dial_timeout_not_positive": ("pinner: {dial_timeout: 0}", ["pinner.dial_timeout"]),
    "two_listeners_one_port": (
        "pinner: {grpc_address: '127.0.0.1:5005'}",
        ["pinner.grpc_address", "discovery.metrics_address", "5005"],
    ),
    "registry_port_on_discovery_port": (
        "registry: {port: 5001}",
        ["registry.port", "discovery.port", "5001"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_AT_START))
def test_combinations_services_refuse_are_refused_naming_keys_and_file(
    tmp_path: Path, case: str
) -> None:
    text, words = REFUSED_AT_START[case]
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, message


def test_a_combination_set_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "discovery: {record_ttl: 100}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"PEERMIRROR_DISCOVERY__REPUBLISH_INTERVAL": "100"})
    assert "environment PEERMIRROR_DISCOVERY__REPUBLISH_INTERVAL" in str(err.value)


def test_listeners_apart_or_ephemeral_are_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "registry: {host: 127.0.0.1, port: 5001, metrics_address: '127.0.0.1:0'}\n"
        "discovery: {host: 10.0.0.5, metrics_address: '127.0.0.1:0'}\n"
        "pinner: {metrics_address: '127.0.0.1:0', grpc_address: 'unix:/run/pm.sock'}\n",
    )
    cfg = load_config(path, env={})
    assert cfg.registry.port == cfg.discovery.port == 5001
