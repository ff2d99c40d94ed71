"""Conversions between peer.proto messages and the Kademlia core's types, and request checks.

Kept apart from the gRPC adapters so the rules (what a well-formed contact is, which address
a caller really has) are plain functions with their own tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import unquote

from google.protobuf.duration_pb2 import Duration

from services.common.errors import InvalidArgumentError
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.discovery.kademlia import ID_BYTES, Contact


def normalize_ip(text: str) -> str | None:
    """Canonical text of an IP address (IPv4-mapped IPv6 unwrapped, no brackets); None if
    `text` is not an IP address."""
    candidate = text.strip()
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
    candidate = candidate.split("%", 1)[0]  # a zone index is local to the receiving host
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def peer_ip(peer: str) -> str | None:
    """The caller's IP from gRPC's `context.peer()` ("ipv4:1.2.3.4:567",
    "ipv6:[::1]:567", brackets possibly percent-encoded); None for anything else (unix
    sockets), whose callers have no address other nodes could use."""
    scheme, sep, rest = unquote(peer).partition(":")
    if not sep or scheme not in ("ipv4", "ipv6"):
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return normalize_ip(host)


def _check_port(value: int, field: str) -> int:
    if not 1 <= value <= 65535:
        raise InvalidArgumentError(f"must be a TCP port 1-65535, got {value}", field=field)
    return value


def check_id_field(value: bytes, field: str) -> bytes:
    """`value` when it is a 32-byte ID or key; InvalidArgumentError naming `field` otherwise."""
    if len(value) != ID_BYTES:
        raise InvalidArgumentError(f"must be {ID_BYTES} bytes, got {len(value)}", field=field)
    return value


def sender_contact(has_sender: bool, sender: pb.SenderInfo, address: str) -> Contact:
    """The caller as a contact: ID and ports from its SenderInfo, address from the connection."""
    if not has_sender:
        raise InvalidArgumentError("is required", field="sender")
    node_id = check_id_field(sender.node_id, "sender.node_id")
    return Contact(
        node_id,
        address,
        _check_port(sender.discovery_port, "sender.discovery_port"),
        _check_port(sender.registry_port, "sender.registry_port"),
    )


def check_keys(keys: Sequence[bytes], limit: int) -> list[bytes]:
    """A batch of DHT keys: at least one, at most `limit`, each 32 bytes."""
    if not keys:
        raise InvalidArgumentError("at least one key is required", field="keys")
    if len(keys) > limit:
        raise InvalidArgumentError(f"at most {limit} keys per call, got {len(keys)}", field="keys")
    return [check_id_field(key, f"keys[{i}]") for i, key in enumerate(keys)]


def contact_to_proto(contact: Contact) -> pb.Contact:
    """The proto form of a contact."""
    return pb.Contact(
        node_id=contact.node_id,
        address=contact.address,
        discovery_port=contact.discovery_port,
        registry_port=contact.registry_port,
    )


def contact_from_proto(message: pb.Contact) -> Contact | None:
    """A contact from another node's answer; None when it is unusable (bad ID, address or
    port), so one bad entry does not spoil the rest of an answer."""
    address = normalize_ip(message.address)
    if (
        len(message.node_id) != ID_BYTES
        or address is None
        or not 1 <= message.discovery_port <= 65535
        or not 1 <= message.registry_port <= 65535
    ):
        return None
    return Contact(message.node_id, address, message.discovery_port, message.registry_port)


def contacts_from_proto(messages: Sequence[pb.Contact]) -> list[Contact]:
    """The usable contacts of an answer, in order."""
    out: list[Contact] = []
    for message in messages:
        contact = contact_from_proto(message)
        if contact is not None:
            out.append(contact)
    return out


def duration(seconds: float) -> Duration:
    """A protobuf Duration of `seconds` (negative clamped to zero)."""
    value = Duration()
    value.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return value


def seconds(value: Duration) -> float:
    """A protobuf Duration in seconds."""
    return float(value.ToNanoseconds()) / 1e9
