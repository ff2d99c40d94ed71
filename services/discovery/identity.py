"""The node's DHT identity: derived from its certificate over mutual TLS, else kept in the data dir.

Over mutual TLS a node ID is the SHA-256 of the certificate's public key (its DER
SubjectPublicKeyInfo), as libp2p derives peer IDs from keys: every peer call is checked against
the certificate of its connection, so no node can claim another's ID or mint many. Without TLS
nothing can be proved; the ID is a random one kept in the data dir so a restart rejoins as the
same node.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.config import ConfigError
from services.common.logsetup import get_logger
from services.common.tls import GRPC_PEER_CERT_KEY, TlsFiles
from services.discovery.kademlia import NodeIdError, format_node_id, parse_node_id, random_node_id

NODE_ID_FILE = "node_id"
# Peer certificates whose identity is kept parsed: a node talks to the same few peers again and
# again, and parsing a certificate costs more than the rest of a small call.
IDENTITY_CACHE = 1024

log = get_logger(__name__)


def node_id_of_certificate(pem: bytes) -> bytes:
    """The node ID a certificate (PEM) gives its holder: SHA-256 of its SubjectPublicKeyInfo,
    so it follows the key (a certificate renewed for the same key keeps the ID)."""
    # Imported here: `cryptography` costs ~10 MiB of resident memory, needed only with TLS.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def node_id_for(data_dir: Path, tls: TlsFiles | None) -> bytes:
    """This node's ID: from its certificate over mutual TLS, else the data dir's ID file."""
    if tls is None:
        return load_or_create_node_id(data_dir)
    _ca, cert, _key = tls.read()
    try:
        return node_id_of_certificate(cert)
    except ValueError as exc:
        raise ConfigError(
            f"tls.cert_file: {tls.cert_file} is not a PEM certificate: {exc}"
        ) from None


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What the verified certificate of a caller proves: its addresses and its node ID."""

    ips: list[str]
    node_id: bytes


class PeerIdentities:
    """Reads the identity of a gRPC caller from its verified client certificate (cached)."""

    def __init__(self, size: int = IDENTITY_CACHE) -> None:
        self._size = size
        self._cache: OrderedDict[bytes, PeerIdentity | None] = OrderedDict()

    def of(self, auth_context: Mapping[str, Iterable[bytes]]) -> PeerIdentity | None:
        """The caller's identity; None when the call came without a certificate over TLS."""
        pems = list(auth_context.get(GRPC_PEER_CERT_KEY, ()))
        if not pems:
            return None
        pem = pems[0]
        if pem in self._cache:
            self._cache.move_to_end(pem)
            return self._cache[pem]
        identity = _parse_identity(pem)
        self._cache[pem] = identity
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return identity


def _parse_identity(pem: bytes) -> PeerIdentity | None:
    from cryptography import x509

    from services.common.pki import identity_ips

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return PeerIdentity(identity_ips(cert), node_id_of_certificate(pem))


def load_or_create_node_id(data_dir: Path) -> bytes:
    """The ID stored in `data_dir/node_id` (64 hex characters), created on first start.

    An unreadable ID file is replaced by a new ID with a warning rather than stopping the
    service: the ID only has to be stable, and records under an old ID simply expire.
    """
    path = data_dir / NODE_ID_FILE
    try:
        return parse_node_id(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        pass
    except (NodeIdError, UnicodeDecodeError) as exc:
        log.warning("node id file unusable, creating a new id", path=str(path), error=str(exc))
    node_id = random_node_id()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so a crash never leaves a half-written ID behind.
    tmp = path.with_name(f".{NODE_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(format_node_id(node_id) + "\n", encoding="ascii")
    os.replace(tmp, path)
    return node_id


class ServerIdentities:
    """The node ID of the certificate a peer's Peer service presents, per endpoint (cached).

    gRPC's Python client does not show the server certificate of a call, so the certificate is
    read over a TLS handshake of our own with the same trust (cluster CA, IP SAN of the address
    dialled, our client certificate); a node answering under an ID its certificate does not give
    it is then caught before its answer is believed.
    """

    def __init__(self, context: ssl.SSLContext, *, size: int = IDENTITY_CACHE) -> None:
        self._context = context
        self._size = size
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def known(self, address: str, port: int) -> bytes | None:
        """The ID last read at an endpoint, if any."""
        return self._cache.get((address, port))

    async def read(self, address: str, port: int, within: float) -> bytes | None:
        """The ID of the certificate served at `address`:`port` now; None when no TLS
        handshake the cluster CA vouches for completes `within` seconds."""
        try:
            async with asyncio.timeout(within):
                _reader, writer = await asyncio.open_connection(
                    address, port, ssl=self._context, server_hostname=address
                )
        except (OSError, ssl.SSLError, TimeoutError):
            return None
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            # Aborted, not closed: a TLS close waits for the server's close_notify, which a
            # gRPC server that saw no HTTP/2 preface may never send.
            writer.transport.abort()
        if not der:
            return None
        node_id = node_id_of_certificate(ssl.DER_cert_to_PEM_cert(der).encode("ascii"))
        self._cache[(address, port)] = node_id
        self._cache.move_to_end((address, port))
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return node_id

    async def confirm(self, address: str, port: int, node_id: bytes, within: float) -> bool:
        """Whether the node answering at the endpoint holds the certificate of `node_id`
        (read again when the cached one names another ID: the endpoint may have a new node)."""
        if self.known(address, port) == node_id:
            return True
        return await self.read(address, port, within) == node_id
