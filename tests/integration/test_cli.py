"""The installed `peermirror` command: help texts, config checking and config error reporting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli.main import build_parser
from tests.harness.service_procs import REPO_ROOT

# The console script pip installs next to the interpreter running the tests.
PEERMIRROR = str(Path(sys.executable).parent / "peermirror")
SUBCOMMANDS = ("discovery", "registry", "pinner", "node", "config")


def peermirror(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PEERMIRROR_")}
    return subprocess.run(
        [PEERMIRROR, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


def test_top_level_help_lists_every_subcommand() -> None:
    result = peermirror("--help")
    assert result.returncode == 0
    assert "peer-to-peer OCI registry mirror" in result.stdout
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize(
    ("argv", "describes"),
    [
        (("discovery",), "Run the discovery service"),
        (("registry",), "Run the registry service"),
        (("pinner",), "Run the pinner service"),
        (("node",), "Run discovery, registry and pinner as child processes"),
        (("config",), "Inspect peermirror's node configuration"),
        (("config", "check"), "print the effective configuration"),
        (("config", "show-defaults"), "Print the built-in defaults"),
    ],
)
def test_each_subcommand_help_describes_itself(argv: tuple[str, ...], describes: str) -> None:
    result = peermirror(*argv, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: peermirror {' '.join(argv)}" in result.stdout
    assert describes in " ".join(result.stdout.split())
    if argv[0] != "config" or argv == ("config", "check"):
        assert "--config FILE" in result.stdout


def test_missing_subcommand_is_a_usage_error() -> None:
    result = peermirror()
    assert result.returncode == 2
    assert "usage: peermirror" in result.stderr


def _registered_commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices or {})


def test_parser_registers_the_service_commands() -> None:
    assert set(SUBCOMMANDS) <= set(_registered_commands())


@pytest.mark.parametrize("name", _registered_commands())
def test_every_registered_command_has_help(name: str) -> None:
    result = peermirror(name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: peermirror {name}" in result.stdout


def _bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("registry:\n  port: not-a-port\n  colour: blue\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "argv",
    [("registry",), ("discovery",), ("pinner",), ("node",), ("config", "check")],
)
def test_config_errors_name_both_keys_and_the_file_and_exit_2(
    argv: tuple[str, ...], tmp_path: Path
) -> None:
    path = _bad_config(tmp_path)
    result = peermirror(*argv, "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "registry.port" in result.stderr
    assert "registry.colour" in result.stderr
    assert str(path) in result.stderr


def test_env_override_errors_name_the_variable(tmp_path: Path) -> None:
    result = peermirror("config", "check", env={"PEERMIRROR_REGISTRY__PORT": "many"})
    assert result.returncode == 2
    assert "PEERMIRROR_REGISTRY__PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_prints_the_effective_config(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("registry:\n  port: 7443\nstore:\n  backend: oci-layout\n", encoding="utf-8")
    result = peermirror(
        "config",
        "check",
        "--skip-files",
        "--config",
        str(path),
        env={"PEERMIRROR_PINNER__RESYNC_INTERVAL": "9"},
    )
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["registry"]["port"] == 7443
    assert effective["store"]["backend"] == "oci-layout"
    assert effective["pinner"]["resync_interval"] == 9.0
    assert effective["discovery"]["port"] == 5001


def test_show_defaults_is_a_loadable_commented_config(tmp_path: Path) -> None:
    result = peermirror("config", "show-defaults")
    assert result.returncode == 0, result.stderr
    assert "# HTTP listen port of the registry (int)" in result.stdout
    path = tmp_path / "defaults.yaml"
    path.write_text(result.stdout, encoding="utf-8")
    again = peermirror("config", "check", "--skip-files", "--config", str(path))
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load(again.stdout) == yaml.safe_load(result.stdout)


# --- config check runs every check a service makes at start -----------------------------------

# Configs each service refuses at start (the service named), with the key the error must name.
START_REFUSALS: list[tuple[str, dict[str, dict[str, Any]], str]] = [
    ("discovery", {"discovery": {"republish_interval": 600, "record_ttl": 600}}, "record_ttl"),
    ("discovery", {"node": {"address": "not-an-ip"}}, "node.address"),
    ("registry", {"registry": {"filters": ["("]}}, "registry.filters"),
    ("pinner", {"pinner": {"containerd_version": "two"}}, "pinner.containerd_version"),
    ("registry", {"registry": {"resolve_timeout": float("nan")}}, "registry.resolve_timeout"),
]


@pytest.mark.parametrize(("service", "values", "key"), START_REFUSALS)
def test_config_check_refuses_what_the_service_refuses(
    tmp_path: Path, service: str, values: dict[str, dict[str, Any]], key: str
) -> None:
    # Everything a service would touch stays in tmp_path, should it start after all.
    data: dict[str, dict[str, Any]] = {
        "tls": {"enabled": False},
        "node": {"data_dir": str(tmp_path / "data")},
        "registry": {"registries_file": str(tmp_path / "registries.yaml")},
        "pinner": {"certs_dir": str(tmp_path / "certs.d"), "images_dir": str(tmp_path)},
        "store": {"backend": "oci-layout", "oci_layout_path": str(tmp_path / "layout")},
    }
    for section, keys in values.items():
        data.setdefault(section, {}).update(keys)
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    for argv in (("config", "check"), (service,)):
        result = peermirror(*argv, "--config", str(path))
        assert result.returncode == 2, (argv, result.stderr)
        assert "Traceback" not in result.stderr
        assert key in result.stderr and str(path) in result.stderr, (argv, result.stderr)


def test_config_check_reads_the_registries_file_as_the_pinner_does(tmp_path: Path) -> None:
    registries = tmp_path / "registries.yaml"
    registries.write_text("mirrors:\n  docker.io:\n    endpoint: 5\n", encoding="utf-8")
    path = tmp_path / "node.yaml"
    path.write_text(
        f"tls: {{enabled: false}}\nregistry: {{registries_file: '{registries}'}}\n",
        encoding="utf-8",
    )
    result = peermirror("config", "check", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "registry.registries_file" in result.stderr
    assert str(registries) in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_needs_the_tls_files_the_services_load(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "node": {"data_dir": str(tmp_path / "data")},
                "registry": {"port": 0, "grpc_address": "127.0.0.1:0"},
                "discovery": {"port": 0, "local_address": "127.0.0.1:0"},
            }
        ),
        encoding="utf-8",
    )
    result = peermirror("config", "check", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "tls.ca_file" in result.stderr and str(path) in result.stderr
    # The services refuse the same way at start, naming the config file too.
    for service in ("registry", "discovery"):
        started = peermirror(service, "--config", str(path))
        assert started.returncode == 2, started.stderr
        assert "tls" in started.stderr and str(path) in started.stderr, started.stderr
        assert "Traceback" not in started.stderr
    # Checking a node's config elsewhere: the files it names are not looked at.
    elsewhere = peermirror("config", "check", "--skip-files", "--config", str(path))
    assert elsewhere.returncode == 0, elsewhere.stderr
