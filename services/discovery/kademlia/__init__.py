"""Pure Kademlia core of the discovery service: IDs, routing table, lookups, provider records."""

from __future__ import annotations

from services.discovery.kademlia.contact import Contact
from services.discovery.kademlia.lookup import DEFAULT_ALPHA, Lookup, QueryState
from services.discovery.kademlia.node import DhtConfig, DhtNode, Maintenance
from services.discovery.kademlia.node_id import (
    ID_BITS,
    ID_BYTES,
    NodeIdError,
    common_prefix_length,
    dht_key,
    format_node_id,
    parse_node_id,
    random_node_id,
    short_id,
    xor_distance,
)
from services.discovery.kademlia.peer_budget import PeerBudgets, RecordRateExceeded
from services.discovery.kademlia.providers import (
    AdvertisedKey,
    AdvertisedKeys,
    ProviderRecord,
    ProviderStore,
)
from services.discovery.kademlia.routing_table import (
    DEFAULT_K,
    AddResult,
    AddStatus,
    PeerEntry,
    RoutingTable,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_K",
    "ID_BITS",
    "ID_BYTES",
    "AddResult",
    "AddStatus",
    "AdvertisedKey",
    "AdvertisedKeys",
    "Contact",
    "DhtConfig",
    "DhtNode",
    "Lookup",
    "Maintenance",
    "NodeIdError",
    "PeerBudgets",
    "PeerEntry",
    "ProviderRecord",
    "ProviderStore",
    "QueryState",
    "RecordRateExceeded",
    "RoutingTable",
    "common_prefix_length",
    "dht_key",
    "format_node_id",
    "parse_node_id",
    "random_node_id",
    "short_id",
    "xor_distance",
]
