"""`peermirror certs`: the cluster CA and node certificates, written owner-only."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.cli.main import main
from services.common import pki
from services.common.config import TlsSection, load_config
from services.common.tls import tls_files
from services.pinner.service import hosts_options


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would leave new files world-readable: the writer must not rely on it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_and_node_write_a_verifiable_pair_owner_only(
    tmp_path: Path, open_umask: None, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, node_dir = tmp_path / "ca", tmp_path / "node-1"
    assert main(["certs", "init", "--out", str(ca_dir)]) == 0
    argv = ["certs", "node", "--name", "node-1", "--ip", "10.0.0.7", "--dns", "node-1.lan"]
    assert main([*argv, "--ca-dir", str(ca_dir), "--out", str(node_dir)]) == 0
    written = sorted(p.name for p in (*ca_dir.iterdir(), *node_dir.iterdir()))
    assert written == ["ca.crt", "ca.crt", "ca.key", "node.crt", "node.key"]
    for path in (*ca_dir.iterdir(), *node_dir.iterdir()):
        assert _mode(path) == 0o600, path
    ca = pki.load_ca(ca_dir)
    cert = pki.load_cert(node_dir / "node.crt")
    cert.verify_directly_issued_by(ca.cert)
    # Loopback is named too (the local containerd dials 127.0.0.1) but is no identity.
    assert pki.san_ips(cert) == ["10.0.0.7", "127.0.0.1", "::1"]
    assert pki.identity_ips(cert) == ["10.0.0.7"]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["node-1", "node-1.lan", "localhost"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (node_dir / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    assert "ca.key" not in {p.name for p in node_dir.iterdir()}
    assert "keep the key off the nodes" in capsys.readouterr().out


def test_rewriting_a_world_readable_file_makes_it_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    pki.write_private(path, b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600


def test_init_refuses_to_replace_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "ca.key").read_bytes()
    assert main(["certs", "init", "--out", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "ca.key").read_bytes() == before
    assert main(["certs", "init", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.key").read_bytes() != before


def test_node_needs_an_ip_and_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "n")
    assert main(["certs", "node", "--name", "n", "--ip", "node-1", "--out", out]) == 2
    assert "not an IP address" in capsys.readouterr().err
    missing = str(tmp_path / "no-ca")
    argv = ["certs", "node", "--name", "n", "--ip", "10.0.0.1", "--ca-dir", missing]
    assert main([*argv, "--out", out]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_tls_is_on_by_default_with_files_under_the_data_dir(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"node:\n  data_dir: {tmp_path}\n", encoding="utf-8")
    cfg = load_config(config, env={})
    assert cfg.tls == TlsSection()
    files = tls_files(cfg)
    assert files is not None
    assert files.ca_file == tmp_path / "tls" / "ca.crt"
    assert files.cert_file == tmp_path / "tls" / "node.crt"
    assert files.key_file == tmp_path / "tls" / "node.key"
    plain = load_config(config, env={"PEERMIRROR_TLS__ENABLED": "false"})
    assert tls_files(plain) is None


def test_containerd_presents_the_node_certificate_unless_told_otherwise(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"node:\n  data_dir: {tmp_path}\n", encoding="utf-8")
    opts = hosts_options(load_config(config, env={}))
    assert (opts.ca_file, opts.client_cert_file, opts.client_key_file) == (
        str(tmp_path / "tls" / "ca.crt"),
        str(tmp_path / "tls" / "node.crt"),
        str(tmp_path / "tls" / "node.key"),
    )
    own = {"PEERMIRROR_PINNER__CA_FILE": "/etc/ca.pem"}
    assert hosts_options(load_config(config, env=own)).ca_file == "/etc/ca.pem"
    plain = hosts_options(load_config(config, env={"PEERMIRROR_TLS__ENABLED": "false"}))
    assert (plain.ca_file, plain.client_cert_file, plain.client_key_file) == (None, None, None)
