"""The cluster PKI: a cluster CA and node certificates signed by it, written owner-only.

Every node holds one certificate used both as TLS server (registry port, discovery peer port)
and as TLS client (node-to-node fetches, discovery calls, containerd's mirror requests). Its
subject alternative names carry the node's IP address, which is what binds a node's identity
in the DHT to the address it may advertise content for.

Keys are EC P-256: accepted by every TLS stack involved (OpenSSL under Python, BoringSSL under
gRPC, Go's crypto/tls under containerd).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.cert_names import CA_CERT_FILE, CA_KEY_FILE, NODE_CERT_FILE, NODE_KEY_FILE
from services.common.errors import PeermirrorError

CA_VALIDITY = datetime.timedelta(days=3650)
NODE_VALIDITY = datetime.timedelta(days=825)
# Certificates start a little in the past so a node whose clock lags accepts them at once.
BACKDATE = datetime.timedelta(minutes=5)
FILE_MODE = 0o600


class PkiError(PeermirrorError):
    """A certificate or key is missing, unreadable or not what was expected."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(
    common_name: str = "peermirror cluster CA",
    *,
    not_before: datetime.datetime | None = None,
    valid_for: datetime.timedelta = CA_VALIDITY,
) -> Issued:
    """A new self-signed cluster CA (may sign node certificates only: path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else _now() - BACKDATE
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(signs_certificates=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures always; certificate and CRL signing only for the CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


LOOPBACK_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def issue_node(
    ca: Issued,
    name: str,
    ip: str,
    *,
    dns_names: tuple[str, ...] = (),
    not_before: datetime.datetime | None = None,
    valid_for: datetime.timedelta = NODE_VALIDITY,
) -> Issued:
    """A node certificate signed by `ca`: server and client use, SANs = `ip`, `name` and
    `dns_names`. Raises ValueError when `ip` is not an IP address."""
    address = ipaddress.ip_address(ip)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else _now() - BACKDATE
    # The node's own containerd dials the embedded mirror at https://127.0.0.1:<port> (hosts.toml),
    # so the certificate must also be valid for loopback; identity_ips() leaves these out.
    ips = dict.fromkeys((address, *LOOPBACK_IPS))
    sans: list[x509.GeneralName] = [x509.IPAddress(ip) for ip in ips]
    sans += [x509.DNSName(n) for n in dict.fromkeys((name, *dns_names, "localhost")) if n]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(signs_certificates=False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def identity_ips(cert: x509.Certificate) -> list[str]:
    """The addresses `cert` vouches for as a node's identity: its IP SANs without the loopback
    names every node certificate carries for local serving (unless loopback is all it names)."""
    ips = san_ips(cert)
    loopback = {str(ip) for ip in LOOPBACK_IPS}
    routable = [ip for ip in ips if ip not in loopback]
    return routable or ips


def san_ips(cert: x509.Certificate) -> list[str]:
    """The IP addresses among `cert`'s subject alternative names, in canonical text."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress)]


# --- files -----------------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by the owner only, whatever the umask, replacing any
    file there (written aside and renamed, so no reader sees a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        # The mode passed to open is filtered by the umask and ignored for an existing file.
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            fd = -1
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_ca(directory: Path, ca: Issued) -> tuple[Path, Path]:
    """Write ``ca.crt`` and ``ca.key`` into `directory`; returns their paths."""
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    write_private(key_path, ca.key_pem)
    write_private(cert_path, ca.cert_pem)
    return cert_path, key_path


def write_node(directory: Path, node: Issued, ca_cert: x509.Certificate) -> tuple[Path, ...]:
    """Write ``node.crt``, ``node.key`` and the CA's ``ca.crt`` (no CA key) into `directory`:
    everything a node needs; returns the paths written."""
    paths = (directory / NODE_CERT_FILE, directory / NODE_KEY_FILE, directory / CA_CERT_FILE)
    write_private(paths[1], node.key_pem)
    write_private(paths[0], node.cert_pem)
    write_private(paths[2], ca_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read: {exc.strerror}") from None


def load_cert(path: Path) -> x509.Certificate:
    """The PEM certificate at `path`."""
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate: {exc}") from None


def load_ca(directory: Path) -> Issued:
    """The cluster CA (certificate and key) `write_ca` wrote into `directory`."""
    cert = load_cert(directory / CA_CERT_FILE)
    key_path = directory / CA_KEY_FILE
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{key_path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: not an EC private key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise PkiError(f"{key_path}: does not match {directory / CA_CERT_FILE}")
    return Issued(cert, key)
