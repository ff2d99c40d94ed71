"""K3s's embedded-registry and disable-default-registry-endpoint: parsing, precedence, effects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from services.common.config import (
    ConfigError,
    K3sSection,
    NodeConfig,
    describe_config,
    dump_config,
    load_config,
)
from services.common.k3s.mirror_policy import Policy
from services.common.k3s.registries import parse_registries
from services.common.k3s.switches import (
    K3sConfigError,
    config_files,
    merge_switches,
    parse_switch,
    read_switches,
    switches_from_mapping,
)
from services.common.oci.errors import ErrorCode, OciError
from services.pinner.hosts_toml import render_hosts_files
from services.pinner.service import hosts_options, participates


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("PEERMIRROR_"):
            monkeypatch.delenv(var)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- reading K3s config files ---------------------------------------------------------------


@pytest.mark.parametrize("text", ["true", "True", "TRUE", "t", "T", "1"])
def test_switch_accepts_go_true(text: str) -> None:
    assert parse_switch(text, "x") is True


@pytest.mark.parametrize("text", ["false", "False", "FALSE", "f", "F", "0"])
def test_switch_accepts_go_false(text: str) -> None:
    assert parse_switch(text, "x") is False


@pytest.mark.parametrize("value", ["yes", "", 1, None, ["true"]])
def test_switch_refuses_other_values(value: object) -> None:
    with pytest.raises(K3sConfigError, match="expected true or false"):
        parse_switch(value, "f.yaml: embedded-registry")


def test_only_the_two_switches_are_taken_from_a_k3s_document() -> None:
    data = {
        "embedded-registry": True,
        "disable-default-registry-endpoint": "false",
        "token": "secret",
        "node-label": ["a=b"],
        "embedded_registry": False,  # not K3s's spelling: ignored like any unknown key
    }
    assert switches_from_mapping(data, "c.yaml") == {
        "embedded-registry": True,
        "disable-default-registry-endpoint": False,
    }
    assert switches_from_mapping(None, "c.yaml") == {}
    with pytest.raises(K3sConfigError, match="must be a mapping"):
        switches_from_mapping(["embedded-registry"], "c.yaml")


def test_later_layers_win() -> None:
    assert merge_switches(
        [
            {"embedded-registry": True},
            {"disable-default-registry-endpoint": True},
            {},
            {"embedded-registry": False},
        ]
    ) == {"embedded-registry": False, "disable-default-registry-endpoint": True}


def test_dropins_are_read_after_the_file_in_name_order(tmp_path: Path) -> None:
    main = write(tmp_path / "config.yaml", "embedded-registry: true\nwrite-kubeconfig-mode: 600\n")
    write(tmp_path / "config.yaml.d" / "20-off.yaml", "embedded-registry: false\n")
    write(tmp_path / "config.yaml.d" / "10-on.yml", "embedded-registry: true\n")
    write(tmp_path / "config.yaml.d" / "30-notes.txt", "embedded-registry: maybe\n")
    assert [p.name for p in config_files(main)] == ["config.yaml", "10-on.yml", "20-off.yaml"]
    assert read_switches(main) == {"embedded-registry": False}


def test_missing_k3s_config_sets_nothing(tmp_path: Path) -> None:
    assert read_switches(tmp_path / "config.yaml") == {}
    # Drop-ins alone still count (K3s reads them without a main file too).
    write(tmp_path / "config.yaml.d" / "a.yaml", "disable-default-registry-endpoint: true\n")
    assert read_switches(tmp_path / "config.yaml") == {"disable-default-registry-endpoint": True}


# --- the node config -------------------------------------------------------------------------


def test_defaults_take_part() -> None:
    cfg = load_config(None, env={})
    assert cfg.k3s == K3sSection()
    assert cfg.k3s.takes_part is True
    assert cfg.pinner.disable_default_endpoint is False


def test_k3s_section_uses_k3s_spelling(tmp_path: Path) -> None:
    path = write(
        tmp_path / "node.yaml",
        "k3s:\n  embedded-registry: false\n  disable-default-registry-endpoint: true\n",
    )
    cfg = load_config(path, env={})
    assert cfg.k3s.embedded_registry is False
    assert cfg.k3s.takes_part is False
    assert cfg.pinner.disable_default_endpoint is True


def test_underscore_spelling_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path / "node.yaml", "k3s:\n  embedded_registry: false\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "unknown key 'k3s.embedded_registry' (spelled 'embedded-registry'" in str(err.value)


def test_wrong_type_names_the_hyphenated_key(tmp_path: Path) -> None:
    path = write(tmp_path / "node.yaml", "k3s:\n  embedded-registry: sometimes\n")
    with pytest.raises(ConfigError, match=r"k3s\.embedded-registry: expected bool"):
        load_config(path, env={})


def test_environment_overrides_use_underscores() -> None:
    cfg = load_config(
        None,
        env={
            "PEERMIRROR_K3S__EMBEDDED_REGISTRY": "false",
            "PEERMIRROR_K3S__DISABLE_DEFAULT_REGISTRY_ENDPOINT": "true",
        },
    )
    assert cfg.k3s == K3sSection(embedded_registry=False, disable_default_registry_endpoint=True)
    assert cfg.pinner.disable_default_endpoint is True


def test_k3s_config_file_fills_unset_switches(tmp_path: Path) -> None:
    k3s = write(
        tmp_path / "k3s" / "config.yaml",
        "embedded-registry: false\ndisable-default-registry-endpoint: true\ntoken: x\n",
    )
    path = write(tmp_path / "node.yaml", f"node:\n  k3s_config: {k3s}\n")
    cfg = load_config(path, env={})
    assert cfg.k3s == K3sSection(embedded_registry=False, disable_default_registry_endpoint=True)
    assert cfg.pinner.disable_default_endpoint is True


def test_our_section_wins_over_the_k3s_file(tmp_path: Path) -> None:
    k3s = write(
        tmp_path / "k3s" / "config.yaml",
        "embedded-registry: false\ndisable-default-registry-endpoint: true\n",
    )
    path = write(
        tmp_path / "node.yaml",
        f"node:\n  k3s_config: {k3s}\nk3s:\n  embedded-registry: true\n"
        "pinner:\n  disable_default_endpoint: false\n",
    )
    cfg = load_config(path, env={})
    assert cfg.k3s.embedded_registry is True
    # Unset in our section, so the K3s file's value decides, over pinner.disable_default_endpoint.
    assert cfg.k3s.disable_default_registry_endpoint is True
    assert cfg.pinner.disable_default_endpoint is True


def test_pinner_key_stands_when_no_switch_is_set(tmp_path: Path) -> None:
    k3s = write(tmp_path / "k3s" / "config.yaml", "write-kubeconfig-mode: '0644'\n")
    path = write(
        tmp_path / "node.yaml",
        f"node:\n  k3s_config: {k3s}\npinner:\n  disable_default_endpoint: true\n",
    )
    cfg = load_config(path, env={})
    assert cfg.k3s == K3sSection()
    assert cfg.pinner.disable_default_endpoint is True


def test_bad_k3s_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    k3s = write(tmp_path / "config.yaml", "embedded-registry: sometimes\n")
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"PEERMIRROR_NODE__K3S_CONFIG": str(k3s)})
    assert str(err.value).startswith(f"node.k3s_config: {k3s}: embedded-registry:")


def test_dump_round_trips_with_k3s_spelling(tmp_path: Path) -> None:
    cfg = load_config(None, env={"PEERMIRROR_K3S__EMBEDDED_REGISTRY": "false"})
    dumped = dump_config(cfg)
    assert dumped["k3s"] == {"embedded-registry": False, "disable-default-registry-endpoint": None}
    path = write(tmp_path / "node.yaml", yaml.safe_dump(dumped))
    assert load_config(path, env={}) == cfg


def test_reference_lists_the_k3s_spelling() -> None:
    keys = [row[0] for row in describe_config()]
    assert "k3s.embedded-registry" in keys
    assert "k3s.disable-default-registry-endpoint" in keys


# --- what the switch does ----------------------------------------------------------------------


def test_policy_of_a_node_taking_no_part_refuses_everything() -> None:
    policy = Policy(lambda registry: True, taking_part=False, default_registry="docker.io")
    for ns, tag in (("docker.io", "1.0"), (None, None), ("ghcr.io", None)):
        with pytest.raises(OciError) as err:
            policy.check(ns, "library/alpine", tag)
        assert err.value.code is ErrorCode.NAME_UNKNOWN
        assert err.value.status == 404
        assert "takes no part" in err.value.message
    assert Policy(lambda registry: True).check("docker.io", "alpine").name == "library/alpine"


def _cfg(embedded: bool | None) -> NodeConfig:
    return NodeConfig(k3s=K3sSection(embedded_registry=embedded))


def test_hosts_toml_leaves_the_local_mirror_out_when_taking_no_part() -> None:
    registries = parse_registries("mirrors:\n  docker.io:\n    endpoint: [http://127.0.0.1:9]\n")
    taking_part = "\n".join(
        render_hosts_files(registries, hosts_options(_cfg(None))).files.values()
    )
    not_taking = "\n".join(
        render_hosts_files(registries, hosts_options(_cfg(False))).files.values()
    )
    assert "127.0.0.1:6443" in taking_part
    assert "127.0.0.1:6443" not in not_taking
    assert "127.0.0.1:9" in not_taking


def test_nothing_is_advertised_when_taking_no_part() -> None:
    registries = parse_registries("mirrors:\n  docker.io:\n")
    assert participates(_cfg(True), registries) is True
    assert participates(_cfg(False), registries) is False
