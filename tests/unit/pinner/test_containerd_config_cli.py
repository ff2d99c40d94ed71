"""`peermirror containerd-config`: hosts.toml files from registries.yaml; bad input refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from services.cli.main import main
from services.pinner.hosts_toml import MARKER
from services.pinner.hosts_writer import LOCK_FILE

REGISTRIES = """\
mirrors:
  docker.io: {}
  quay.io:
    endpoint: ["https://quay-mirror.example.com"]
"""


def run(tmp_path: Path, text: str, *extra: str) -> tuple[int, Path]:
    registries = tmp_path / "registries.yaml"
    registries.write_text(text)
    out = tmp_path / "certs.d"
    code = main(["containerd-config", "--registries", str(registries), "--out", str(out), *extra])
    return code, out


def test_writes_one_generated_hosts_toml_per_mirrored_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(
        tmp_path,
        REGISTRIES,
        "--registry-port",
        "7443",
        "--ca",
        "/etc/pm/ca.crt",
        "--client-cert",
        "/etc/pm/client.crt",
        "--client-key",
        "/etc/pm/client.key",
    )
    assert code == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("hosts.toml"))
    # The embedded mirror's own host gets a file too (no mirror in front of itself).
    assert files == ["127.0.0.1:7443/hosts.toml", "docker.io/hosts.toml", "quay.io/hosts.toml"]
    printed = capsys.readouterr().out.splitlines()
    assert all(str(out / f) in printed for f in files)
    text = (out / "docker.io" / "hosts.toml").read_text()
    assert text.splitlines()[0] == MARKER
    doc = tomllib.loads(text)
    assert doc["server"] == "https://registry-1.docker.io/v2"
    hosts = list(doc["host"])
    assert hosts[0] == "https://127.0.0.1:7443/v2"
    mirror = doc["host"][hosts[0]]
    assert mirror["ca"] == ["/etc/pm/ca.crt"]
    assert mirror["client"] == [["/etc/pm/client.crt", "/etc/pm/client.key"]]
    quay = tomllib.loads((out / "quay.io" / "hosts.toml").read_text())
    assert list(quay["host"]) == ["https://127.0.0.1:7443/v2", "https://quay-mirror.example.com/v2"]


def test_no_tls_and_server_override(tmp_path: Path) -> None:
    code, out = run(
        tmp_path, "mirrors:\n  docker.io: {}\n", "--no-tls", "--server", "http://127.0.0.1:9"
    )
    assert code == 0
    doc = tomllib.loads((out / "docker.io" / "hosts.toml").read_text())
    assert next(iter(doc["host"])) == "http://127.0.0.1:6443/v2"
    assert doc["server"].startswith("http://127.0.0.1:9")


def test_invalid_registries_names_the_key_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(tmp_path, REGISTRIES)
    assert code == 0
    before = {p: p.read_text() for p in out.rglob("hosts.toml")}
    code, _ = run(tmp_path, "mirrors:\n  docker.io:\n    endpoint: 5\n")
    assert code == 2
    assert "mirrors.docker.io.endpoint" in capsys.readouterr().err
    assert {p: p.read_text() for p in out.rglob("hosts.toml")} == before


def test_missing_registries_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs.d"
    argv = ["containerd-config", "--registries", str(tmp_path / "nope.yaml"), "--out", str(out)]
    assert main(argv) == 2
    assert "file not found" in capsys.readouterr().err
    assert main([*argv, "--missing-ok"]) == 0
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]


def test_key_without_cert_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, REGISTRIES, "--client-key", "/k")
    assert code == 2
    assert "--client-key needs --client-cert" in capsys.readouterr().err
    assert not out.exists()
