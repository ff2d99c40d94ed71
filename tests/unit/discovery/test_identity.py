"""The node ID: from the certificate's key over TLS; else the ID file, created once, read back
unchanged, replaced only when unusable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common import pki
from services.common.config import ConfigError
from services.common.tls import GRPC_PEER_CERT_KEY, TlsFiles
from services.discovery.identity import (
    NODE_ID_FILE,
    PeerIdentities,
    load_or_create_node_id,
    node_id_for,
    node_id_of_certificate,
)


def test_node_id_is_created_then_stable(tmp_path: Path) -> None:
    data_dir = tmp_path / "missing" / "data"
    first = load_or_create_node_id(data_dir)
    assert len(first) == 32
    text = (data_dir / NODE_ID_FILE).read_text()
    assert text == first.hex() + "\n"
    assert load_or_create_node_id(data_dir) == first
    assert [p.name for p in data_dir.iterdir()] == [NODE_ID_FILE]


def test_unusable_node_id_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / NODE_ID_FILE).write_text("not hex at all")
    new = load_or_create_node_id(tmp_path)
    assert (tmp_path / NODE_ID_FILE).read_text().strip() == new.hex()
    assert load_or_create_node_id(tmp_path) == new


def _files(tmp_path: Path, name: str, ca: pki.Issued) -> TlsFiles:
    pki.write_node(tmp_path / name, pki.issue_node(ca, name, "10.0.0.1"), ca.cert)
    return TlsFiles.in_directory(tmp_path / name)


def test_over_tls_the_id_is_the_hash_of_the_certificates_public_key(tmp_path: Path) -> None:
    ca = pki.create_ca()
    files = _files(tmp_path, "node", ca)
    cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    node_id = node_id_for(tmp_path / "data", files)
    assert node_id == hashlib.sha256(spki).digest()
    # No ID file is written or read: the certificate is the identity.
    assert not (tmp_path / "data").exists()
    assert node_id != node_id_for(tmp_path / "data", _files(tmp_path, "other", ca))


def test_without_tls_the_id_file_is_used(tmp_path: Path) -> None:
    assert node_id_for(tmp_path, None) == load_or_create_node_id(tmp_path)


def test_an_unusable_certificate_names_its_key(tmp_path: Path) -> None:
    files = _files(tmp_path, "node", pki.create_ca())
    files.cert_file.write_bytes(b"not a certificate")
    with pytest.raises(ConfigError, match=r"^tls\.cert_file: .*node\.crt"):
        node_id_for(tmp_path, files)


def test_peer_identities_are_parsed_once_per_certificate(tmp_path: Path) -> None:
    files = _files(tmp_path, "node", pki.create_ca())
    pem = files.cert_file.read_bytes()
    identities = PeerIdentities(size=1)
    first = identities.of({GRPC_PEER_CERT_KEY: [pem]})
    assert first is not None
    assert first.ips == ["10.0.0.1"]
    assert first.node_id == node_id_of_certificate(pem)
    assert identities.of({GRPC_PEER_CERT_KEY: [pem]}) is first
    assert identities.of({}) is None
    assert identities.of({GRPC_PEER_CERT_KEY: [b"garbage"]}) is None
