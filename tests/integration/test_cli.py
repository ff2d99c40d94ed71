"""The installed `peermirror` command: help texts, config checking and config error reporting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
        "config", "check", "--config", str(path), env={"PEERMIRROR_PINNER__RESYNC_INTERVAL": "9"}
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
    again = peermirror("config", "check", "--config", str(path))
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load(again.stdout) == yaml.safe_load(result.stdout)
