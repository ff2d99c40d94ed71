"""Serves the status page (GET /status, /status.json) from the same answers `peermirror status`
gathers, plus the discovery's peers, the providers of each local image and recent pulls.

The services are asked exactly as the CLI asks them (:func:`services.cli.status_cmd.observe`,
blocking gRPC and HTTP, so in a worker thread while this loop keeps serving); this registry then
fills in what it knows of itself when its own node-local listeners are not reachable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any

from sanic import HTTPResponse, Request

from services.common.config import NodeConfig
from services.common.grpc_channel import NO_PROXY
from services.common.hostport import join_host_port
from services.common.metrics import Page, version
from services.common.status.observe import observe
from services.common.status.report import build_report, state_of
from services.common.store.protocol import ImageRecord
from services.registry.context import RegistryContext
from services.registry.inflight.coordinator import Coordinator
from services.registry.mirror.hedging import PeerBook, identity
from services.registry.mirror.quarantine import Quarantine
from services.registry.status_view import (
    THIS_NODE,
    ImageRow,
    InflightRow,
    PeerRow,
    StatusData,
    build_document,
    render_html,
)

# Deadline of each call made for one page (the services are node-local: fast or down).
CALL_TIMEOUT = 2.0
# Bounds the work of one page on a node with many images: one lookup per image shown.
MAX_IMAGES = 50
MAX_PROVIDERS = 20


def ask_discovery(
    address: str, image_names: Sequence[str], timeout: float = CALL_TIMEOUT
) -> tuple[list[PeerRow] | None, dict[str, list[str]]]:
    """(routing table, registry addresses of the providers of each name) from the discovery's
    node-local API; (None, {}) when it does not answer. Blocking."""
    import grpc

    from services.common.genproto.peermirror.discovery.v1 import local_pb2 as pb
    from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as pb_grpc

    now = time.time()
    providers: dict[str, list[str]] = {}
    try:
        with grpc.insecure_channel(address, options=NO_PROXY) as ch:
            stub = pb_grpc.LocalDiscoveryStub(ch)
            table = stub.ListPeers(pb.ListPeersRequest(), timeout=timeout)
            peers = [
                PeerRow(
                    node_id=p.contact.node_id.hex(),
                    registry=join_host_port(p.contact.address, p.contact.registry_port),
                    discovery_port=p.contact.discovery_port,
                    last_seen_ago=(
                        round(max(0.0, now - p.last_seen.ToNanoseconds() / 1e9), 1)
                        if p.HasField("last_seen")
                        else None
                    ),
                )
                for p in table.peers
            ]
            for name in image_names:
                found: list[str] = []
                request = pb.FindProvidersRequest(key=name, limit=MAX_PROVIDERS)
                try:
                    for reply in stub.FindProviders(request, timeout=timeout):
                        c = reply.provider
                        found.append(join_host_port(c.address, c.registry_port))
                except grpc.RpcError:
                    pass  # this image's row shows this node only
                providers[name] = sorted(set(found))
    except grpc.RpcError:
        return None, {}
    return peers, providers


def with_relay_state(
    rows: Sequence[PeerRow], book: PeerBook, quarantine: Quarantine[str]
) -> list[PeerRow]:
    """`rows` with what this node's relays know of each peer, matched by node ID (or registry
    address): quarantined, slow (with the rate it was left at), ok (with its smoothed body rate
    while the book still believes it, and header latency), or unused."""
    shown = []
    for row in rows:
        known = [
            p
            for p in book.known()
            if (row.node_id and p.node_id == row.node_id) or str(p) == row.registry
        ]
        record = book.record(known[-1]) if known else None  # the most recently used
        if record is None:
            state, rate = "unused", None
        elif record.slow:
            state, rate = "slow", record.rate
        else:
            state, rate = "ok", book.rate(known[-1])
        if (
            any(p.identity in quarantine for p in known)
            or identity(row.node_id, row.registry) in quarantine
        ):
            state = "quarantined"
        latency = None if record is None else record.latency
        shown.append(dataclasses.replace(row, relay=state, body_rate=rate, header_latency=latency))
    return shown


def image_rows(images: Sequence[ImageRecord], providers: dict[str, list[str]]) -> list[ImageRow]:
    """One row per image (by name), this node first in each node list."""
    return [
        ImageRow(
            name=i.name,
            digest=i.target.digest,
            nodes=[THIS_NODE, *providers.get(i.name, [])],
        )
        for i in sorted(images, key=lambda i: i.name)
    ]


def inflight_rows(coordinator: Coordinator) -> list[InflightRow]:
    """The upstream fetches `coordinator` runs now, oldest first."""
    return [
        InflightRow(
            digest=f.digest,
            image=f"{f.registry}/{f.repository}",
            size=f.spool.size,
            written=f.spool.state.written,
            state=f.spool.state.phase.value,
            started_at=f.started_at,
            local_waiters=f.local_waiters,
            peer_waiters=f.peer_waiters,
            resumes=f.resumes,
            lease_lost=f.lease_lost,
        )
        for f in sorted(coordinator.fetches.values(), key=lambda f: f.started_at)
    ]


def _observe_with_self(ctx: RegistryContext, cfg: NodeConfig) -> dict[str, Any]:
    obs = observe(cfg, CALL_TIMEOUT)
    me = obs.services["registry"]
    # Asked over its own node-local listeners; when those are off or unreachable, this process
    # still knows whether it serves, since when, and which version it is.
    if state_of(me.health) == "DOWN":
        me.health = "SERVING" if ctx.ready else "NOT_SERVING"
    if me.started_at is None:
        me.started_at = ctx.stats.started_at
    if me.version is None:
        me.version = version()
    return build_report(obs)


async def gather(ctx: RegistryContext) -> StatusData:
    """Everything the page shows, asked now."""
    store = ctx.content.keeper.store
    images: list[ImageRecord] | None = None
    if store is not None:
        try:
            images = (await store.list_images())[:MAX_IMAGES]
        except Exception:  # a store that just went away: the page still renders
            images = None
    names = [i.name for i in images or []]
    report, (peers, providers) = await asyncio.gather(
        asyncio.to_thread(_observe_with_self, ctx, ctx.cfg),
        asyncio.to_thread(ask_discovery, ctx.cfg.discovery.local_address, names),
    )
    mirror = ctx.mirror
    if peers is not None and mirror is not None:
        peers = with_relay_state(peers, mirror.book, mirror.quarantine)
    return StatusData(
        report=report,
        now=time.time(),
        peers=peers,
        images=None if images is None else image_rows(images, providers),
        pulls=list(ctx.stats.pulls),
        requests=dict(ctx.stats.requests),
        inflight=None if ctx.inflight is None else inflight_rows(ctx.inflight),
    )


HTML_PATH = "/status"
JSON_PATH = "/status.json"
HTML_TYPE = "text/html; charset=utf-8"
JSON_TYPE = "application/json"


async def html_page(ctx: RegistryContext) -> tuple[str, bytes]:
    """(content type, body) of /status."""
    return HTML_TYPE, render_html(await gather(ctx)).encode("utf-8")


async def json_page(ctx: RegistryContext) -> tuple[str, bytes]:
    """(content type, body) of /status.json."""
    return JSON_TYPE, json.dumps(build_document(await gather(ctx)), indent=2).encode("utf-8")


def listener_pages(ctx: RegistryContext) -> dict[str, Page]:
    """The pages for the registry's node-local metrics listener."""
    return {HTML_PATH: partial(html_page, ctx), JSON_PATH: partial(json_page, ctx)}


AnyRequest = Request[Any, SimpleNamespace]
_HEADERS = {"Cache-Control": "no-store"}


async def status_html(request: AnyRequest) -> HTTPResponse:
    """GET /status on the registry's own port (behind its mTLS when that is on)."""
    ctype, body = await html_page(request.app.ctx)
    return HTTPResponse(body, headers=_HEADERS, content_type=ctype)


async def status_json(request: AnyRequest) -> HTTPResponse:
    """GET /status.json on the registry's own port."""
    ctype, body = await json_page(request.app.ctx)
    return HTTPResponse(body, headers=_HEADERS, content_type=ctype)


def install(app: Any) -> None:
    """Add /status and /status.json to a registry app."""
    # HEAD too: RFC 9110 requires it of every GET resource.
    app.add_route(status_html, HTML_PATH, methods=["GET", "HEAD"], name="status_page")
    app.add_route(status_json, JSON_PATH, methods=["GET", "HEAD"], name="status_json")
