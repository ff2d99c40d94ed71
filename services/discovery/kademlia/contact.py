"""A DHT node as others know it: ID plus where to reach its Peer service and its registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.hostport import join_host_port
from services.discovery.kademlia.node_id import check_id, id_int, short_id


@dataclass(frozen=True, slots=True)
class Contact:
    """Mirrors peermirror.discovery.v1.Contact field for field."""

    node_id: bytes
    address: str
    discovery_port: int
    registry_port: int
    # The ID as an int, computed once: XOR ordering of contacts is the hot path of every lookup.
    key: int = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_id(self.node_id)
        object.__setattr__(self, "key", id_int(self.node_id))

    @property
    def discovery_endpoint(self) -> str:
        """host:port of the Peer service, IPv6 bracketed."""
        return join_host_port(self.address, self.discovery_port)

    @property
    def registry_endpoint(self) -> str:
        """host:port of the registry, IPv6 bracketed."""
        return join_host_port(self.address, self.registry_port)

    def __str__(self) -> str:
        return f"{short_id(self.node_id)}@{self.discovery_endpoint}"
