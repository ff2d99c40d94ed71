"""`peermirror status`'s report: built from what the services answered, rendered as text or JSON.

Pure (no I/O): :mod:`services.common.status.observe` gathers the answers into :class:`Observed`.

The JSON document (``--json``), schema version 1::

    {
      "schema": 1,
      "node": str,                       # node.name from the config
      "ok": bool,                        # every service UP
      "services": {                      # always the three keys below
        "registry" | "discovery" | "pinner": {
          "state": "UP" | "NOT_READY" | "DOWN",   # SERVING / answered otherwise / no answer
          "health": str,                 # gRPC health status name, or "UNREACHABLE: <code>"
          "address": str,                # node-local gRPC address asked
          "metrics_address": str | null, # node-local /metrics listener (null = off)
          "version": str | null,         # from peermirror_build_info
          "uptime_seconds": float | null
        }
      },
      "peers": int | null,               # discovery routing table size
      "provider_records": int | null,    # records held for other nodes' keys
      "advertised_keys": int | null,     # keys this node advertises
      "pinned_images": int | null,       # null when the pinner has no containerd (oci-layout)
      "leases": {                        # fetch leases (shared first pulls); null: no answer
        "held": int,                     # leases this node holds (it fetches upstream)
        "records": int,                  # leases it keeps as the node closest to their keys
        "granted": int, "expired": int,  # since start, as that deciding node
        "lost": int,                     # leases this node held and lost to another node
        "waits": int                     # its requests told another node fetches the content
      } | null,
      "mirror": {                        # manifest and blob requests of local clients
        "requests": int | null,          # since start
        "hit_rate": float | null,        # served (locally or by peers) / answered, since start
        "recent_requests": int | null,   # in the last recent_window_seconds
        "recent_hit_rate": float | null,
        "recent_window_seconds": float
      },
      "inflight": {                      # shared first pulls (null values: registry not scraped)
        "fetches": int | null,           # upstream fetches this node runs for the cluster now
        "coalesced_waiters": int | null  # requests that waited on a shared fetch, since start
      }
    }

A rate is null when there was no request to take it over (or the registry did not answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.units import format_duration

SCHEMA_VERSION = 1
# Seconds the registry's recent-requests window spans (its gauge and the report's recent rate).
RECENT_WINDOW_S = 300.0
SERVICES = ("registry", "discovery", "pinner")
# Cache results that count for the hit rate: served, or answered as not served. Refusals
# (registries not mirrored) and client mistakes say nothing about the mirror.
SERVED = ("hit", "peer_hit")
NOT_SERVED = ("miss", "error")


@dataclass
class ServiceObservation:
    """What one service answered (None: not answered or not asked)."""

    address: str
    health: str
    metrics_address: str | None = None
    version: str | None = None
    started_at: float | None = None


@dataclass
class Observed:
    """Everything `status` gathered for one node."""

    node: str
    now: float
    services: dict[str, ServiceObservation]
    peers: int | None = None
    provider_records: int | None = None
    advertised_keys: int | None = None
    pinned_images: int | None = None
    # Fetch lease figures from discovery's Stats (keys as in the "leases" document).
    leases: Mapping[str, int] | None = None
    # Requests of local clients since start / recently, by cache label (hit, miss, ...).
    since_start: Mapping[str, int] | None = None
    recent: Mapping[str, int] | None = None
    recent_window: float = RECENT_WINDOW_S
    # Shared first pulls, from the registry's metrics.
    inflight_fetches: int | None = None
    coalesced_waiters: int | None = None


def state_of(health: str) -> str:
    """UP on SERVING, DOWN when nothing answered, NOT_READY for any other answer."""
    if health == "SERVING":
        return "UP"
    if health.startswith("UNREACHABLE"):
        return "DOWN"
    return "NOT_READY"


def hit_rate(counts: Mapping[str, int] | None) -> tuple[int | None, float | None]:
    """(requests answered, share of them served) over cache-labelled counts."""
    if counts is None:
        return None, None
    served = sum(counts.get(label, 0) for label in SERVED)
    total = served + sum(counts.get(label, 0) for label in NOT_SERVED)
    return total, (served / total if total else None)


def build_report(obs: Observed) -> dict[str, Any]:
    """The JSON document described in the module docstring."""
    services: dict[str, Any] = {}
    for name in SERVICES:
        seen = obs.services[name]
        uptime = None if seen.started_at is None else round(max(0.0, obs.now - seen.started_at), 1)
        services[name] = {
            "state": state_of(seen.health),
            "health": seen.health,
            "address": seen.address,
            "metrics_address": seen.metrics_address,
            "version": seen.version,
            "uptime_seconds": uptime,
        }
    requests, rate = hit_rate(obs.since_start)
    recent_requests, recent_rate = hit_rate(obs.recent)
    return {
        "schema": SCHEMA_VERSION,
        "node": obs.node,
        "ok": all(s["state"] == "UP" for s in services.values()),
        "services": services,
        "peers": obs.peers,
        "provider_records": obs.provider_records,
        "advertised_keys": obs.advertised_keys,
        "pinned_images": obs.pinned_images,
        "leases": dict(obs.leases) if obs.leases is not None else None,
        "mirror": {
            "requests": requests,
            "hit_rate": rate,
            "recent_requests": recent_requests,
            "recent_hit_rate": recent_rate,
            "recent_window_seconds": obs.recent_window,
        },
        "inflight": {"fetches": obs.inflight_fetches, "coalesced_waiters": obs.coalesced_waiters},
    }


def exit_code(report: Mapping[str, Any]) -> int:
    """0 when every service is UP, 1 otherwise."""
    return 0 if report["ok"] else 1


def _duration_text(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _value(value: object) -> str:
    return "-" if value is None else str(value)


def _rate(requests: int | None, rate: float | None, when: str) -> str:
    if requests is None:
        return f"{when}: -"
    if rate is None:
        return f"{when}: no requests"
    return f"{when}: {rate * 100:.1f}% of {requests}"


def render_text(report: Mapping[str, Any]) -> str:
    """The human form: a service table, then the node's figures."""
    lines = [f"node {report['node']}: {'ok' if report['ok'] else 'NOT OK'}"]
    lines.append(
        f"{'SERVICE':<10} {'STATE':<9} {'HEALTH':<26} {'VERSION':<9} {'UPTIME':<8} ADDRESS"
    )
    for name in SERVICES:
        s = report["services"][name]
        lines.append(
            f"{name:<10} {s['state']:<9} {s['health']:<26} {_value(s['version']):<9} "
            f"{_duration_text(s['uptime_seconds']):<8} {s['address']}"
        )
    lines.append(
        f"peers {_value(report['peers'])}, provider records {_value(report['provider_records'])}, "
        f"advertised keys {_value(report['advertised_keys'])}, "
        f"pinned images {_value(report['pinned_images'])}"
    )
    leases = report.get("leases")
    if leases is not None:
        lines.append(
            f"fetch leases: held {leases['held']}, deciding {leases['records']} "
            f"(granted {leases['granted']}, expired {leases['expired']}), "
            f"lost {leases['lost']}, waits {leases['waits']}"
        )
    m = report["mirror"]
    recent = _rate(
        m["recent_requests"], m["recent_hit_rate"], f"last {m['recent_window_seconds']:g}s"
    )
    lines.append(f"mirror hit rate: {recent}; {_rate(m['requests'], m['hit_rate'], 'since start')}")
    inflight = report.get("inflight") or {}
    if inflight.get("fetches") is not None:
        lines.append(
            f"shared first pulls: {inflight['fetches']} upstream fetches in flight, "
            f"{_value(inflight.get('coalesced_waiters'))} coalesced waiters since start"
        )
    return "\n".join(lines)
