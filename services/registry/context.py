"""The typed state the registry's Sanic app carries in `app.ctx`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sanic import Sanic
from sanic.config import Config

from services.common.config import NodeConfig, RegistrySection
from services.common.k3s.mirror_policy import Policy
from services.registry.content import ContentService
from services.registry.limits import ClientSlots, RequestLimits
from services.registry.stats import RegistryStats

if TYPE_CHECKING:  # the mirror path imports handler-side modules; keep this module a leaf
    from services.registry.inflight.coordinator import Coordinator
    from services.registry.metrics import RegistryMetrics
    from services.registry.mirror.relay import Mirror


@dataclass
class RegistryContext:
    """Everything request handlers may reach through `request.app.ctx`."""

    cfg: NodeConfig
    policy: Policy
    content: ContentService
    stats: RegistryStats = field(default_factory=RegistryStats)
    # Serves local misses from peers; None when registry.peer_fetch is off.
    mirror: Mirror | None = None
    # One upstream fetch per blob for the cluster (inflight.*); None until wired with a lease
    # client and an upstream fetcher, and when inflight.enabled is off.
    inflight: Coordinator | None = None
    # Flipped by the service once the listener is up, and back when a stop begins, so /readyz
    # takes the node out of rotation before connections are refused.
    ready: bool = False
    # Prometheus metrics served on /metrics; set by create_app.
    metrics: RegistryMetrics | None = None
    # Path/query bounds and the counts of peer relays in flight (registry.max_*).
    limits: RequestLimits = field(default_factory=lambda: RequestLimits.of(RegistrySection()))
    relay_slots: ClientSlots = field(default_factory=lambda: ClientSlots(limit=16, local_limit=128))


RegistryApp = Sanic[Config, RegistryContext]
