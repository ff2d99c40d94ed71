"""Mutual TLS settings of a node, from its config: SSL contexts for HTTP, credentials for gRPC.

One place decides what "secure" means for every listener and client facing other nodes: the
cluster CA is the only trust root (never the system CAs), a client certificate is required,
TLS 1.2 is the floor. Node-local listeners (the LocalDiscovery API, the introspection and
pinner APIs) stay plaintext on loopback and do not use this module.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.cert_names import CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE
from services.common.config import ConfigError, NodeConfig

TLS_DIR = "tls"
# The PEM of the verified peer certificate in a gRPC call's auth context.
GRPC_PEER_CERT_KEY = "x509_pem_cert"


@dataclass(frozen=True)
class TlsFiles:
    """The cluster CA certificate and this node's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def in_directory(cls, directory: Path) -> TlsFiles:
        """The files under their standard names in `directory` (as ``peermirror certs node``
        writes them)."""
        return cls(
            ca_file=directory / CA_CERT_FILE,
            cert_file=directory / NODE_CERT_FILE,
            key_file=directory / NODE_KEY_FILE,
        )

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA PEM, certificate PEM, key PEM); ConfigError naming the file that is unusable."""
        out: list[bytes] = []
        for key, path in (
            ("tls.ca_file", self.ca_file),
            ("tls.cert_file", self.cert_file),
            ("tls.key_file", self.key_file),
        ):
            try:
                out.append(path.read_bytes())
            except OSError as exc:
                raise ConfigError(
                    f"{key}: cannot read {path}: {exc.strerror} (create the files with "
                    "'peermirror certs node', or set tls.enabled: false for plain connections)"
                ) from None
        return out[0], out[1], out[2]


def tls_files(cfg: NodeConfig) -> TlsFiles | None:
    """The TLS files `cfg` names (defaults under ``<node.data_dir>/tls``); None when TLS is
    explicitly turned off."""
    t = cfg.tls
    if not t.enabled:
        return None
    default = TlsFiles.in_directory(cfg.node.data_dir / TLS_DIR)
    return TlsFiles(
        ca_file=t.ca_file or default.ca_file,
        cert_file=t.cert_file or default.cert_file,
        key_file=t.key_file or default.key_file,
    )


def _context(purpose: ssl.Purpose, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        # Only the cluster CA is trusted: a certificate from any public CA is refused.
        ctx.load_verify_locations(cafile=str(files.ca_file))
        ctx.load_cert_chain(str(files.cert_file), str(files.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls: cannot load {files.ca_file}, {files.cert_file} or {files.key_file}: {exc} "
            "(create them with 'peermirror certs node', or set tls.enabled: false)"
        ) from None
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """Context of a listener that requires a client certificate signed by the cluster CA."""
    return _context(ssl.Purpose.CLIENT_AUTH, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """Context of a connection to a peer: presents this node's certificate and accepts only a
    server certificate from the cluster CA whose SANs name the address dialled."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, files)
    ctx.check_hostname = True
    return ctx


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """gRPC server credentials requiring a client certificate signed by the cluster CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def grpc_channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """gRPC channel credentials presenting this node's certificate, trusting the cluster CA."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
