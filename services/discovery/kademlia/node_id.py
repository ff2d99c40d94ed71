"""256-bit Kademlia node IDs and DHT keys: generation, XOR distance, text encoding."""

from __future__ import annotations

import hashlib
import random
import secrets

from services.common.errors import InvalidArgumentError

ID_BYTES = 32
ID_BITS = ID_BYTES * 8


class NodeIdError(InvalidArgumentError):
    """A node ID or DHT key is not exactly 32 bytes (or 64 hex characters)."""


def random_node_id(rng: random.Random | None = None) -> bytes:
    """A fresh node ID; from `rng` when given (deterministic simulations), else the OS CSPRNG."""
    if rng is None:
        return secrets.token_bytes(ID_BYTES)
    return rng.getrandbits(ID_BITS).to_bytes(ID_BYTES, "big")


def dht_key(key: str) -> bytes:
    """The DHT key of a key string: SHA-256 of its UTF-8 bytes (digest or tag reference)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def check_id(value: bytes) -> bytes:
    """Returns `value` when it is a well-formed ID; raises NodeIdError otherwise."""
    if len(value) != ID_BYTES:
        raise NodeIdError(f"node id must be {ID_BYTES} bytes, got {len(value)}")
    return value


def id_int(value: bytes) -> int:
    """The ID as an unsigned integer, so XOR distances compare as plain ints."""
    return int.from_bytes(value, "big")


def int_id(value: int) -> bytes:
    """Inverse of id_int."""
    return value.to_bytes(ID_BYTES, "big")


def xor_distance(a: bytes, b: bytes) -> int:
    """Kademlia distance between two IDs."""
    return id_int(a) ^ id_int(b)


def common_prefix_length(a: bytes, b: bytes) -> int:
    """Number of leading bits `a` and `b` share (ID_BITS when equal)."""
    return ID_BITS - (id_int(a) ^ id_int(b)).bit_length()


def format_node_id(value: bytes) -> str:
    """Text form of an ID for files and logs: 64 lowercase hex characters."""
    return check_id(value).hex()


def parse_node_id(text: str) -> bytes:
    """Parses format_node_id's output (surrounding whitespace allowed, e.g. a trailing newline)."""
    stripped = text.strip()
    if len(stripped) != ID_BYTES * 2:
        raise NodeIdError(f"node id must be {ID_BYTES * 2} hex characters, got {len(stripped)}")
    try:
        return bytes.fromhex(stripped)
    except ValueError as exc:
        raise NodeIdError(f"node id is not hex: {stripped!r}") from exc


def short_id(value: bytes) -> str:
    """First 8 hex characters, enough to tell nodes apart in logs."""
    return value.hex()[:8]
