"""Builders for contacts with chosen IDs, shared by the Kademlia unit tests."""

from __future__ import annotations

from services.discovery.kademlia import ID_BITS, Contact
from services.discovery.kademlia.node_id import int_id


def contact(value: int, address: str | None = None) -> Contact:
    """A contact whose ID is the integer `value`."""
    return Contact(int_id(value), address or f"10.0.0.{value % 250 + 1}", 5001, 6443)


def with_prefix(own: int, shared: int, suffix: int) -> int:
    """An ID sharing exactly `shared` leading bits with `own`, then `suffix` in the rest."""
    flip = 1 << (ID_BITS - 1 - shared)
    keep = ((1 << ID_BITS) - 1) ^ ((flip << 1) - 1)
    return (own & keep) | ((own ^ flip) & flip) | (suffix % flip)
