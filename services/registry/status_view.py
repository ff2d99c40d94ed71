"""The status page's content, as JSON (/status.json) and as self-contained HTML (/status).

Pure (no I/O): :mod:`services.registry.status_page` gathers a :class:`StatusData` from the same
answers `peermirror status` uses (its report is the page's "report" part) plus this registry's
own recent pulls. The HTML has no external assets (inline CSS, no scripts), so it works on an
air-gapped node, and every text taken from the data is escaped.

The JSON document, schema version 1: every key of the `peermirror status --json` report, plus::

    "peer_list": [{"node_id": str, "registry": str, "discovery_port": int,
                   "last_seen_seconds_ago": float | null,
                   # this node's relays from the peer: ok, slow (left for a slow body, asked
                   # after the others), quarantined (sent wrong bytes), unused (none lately)
                   "relay": str, "body_rate_bytes_per_second": float | null,
                   "header_latency_seconds": float | null}] | null,   # null: discovery not asked
    "images": [{"name": str, "digest": str, "nodes": [str]}] | null, # null: store not open
    "recent_pulls": [{"seconds_ago": float, "ref": str, "kind": str, "result": str,
                      "client": "local" | "peer", "source": str, "bytes": int,
                      "seconds": float, "bytes_per_second": float | null}],   # newest first
    "errors": {"<result>": {"local": int, "peer": int}},  # not_found, refused, client_error, error
    "inflight_fetches": [{"digest": str, "image": str, "size": int, "written": int, "state": str,
                  "started_seconds_ago": float, "local_waiters": int, "peer_waiters": int,
                  "resumes": int, "lease_lost": bool}] | null   # null: shared first pulls off
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.status.report import SERVICES, render_text
from services.common.units import format_bytes, format_duration
from services.registry.metrics import CACHE_LABELS
from services.registry.stats import CountKey, PullRecord, Result

PAGE_SCHEMA_VERSION = 1
# "This node" in an image's node list, next to peers' registry addresses.
THIS_NODE = "this node"
# Results counted as errors on the page: everything but a hit.
ERROR_RESULTS = (Result.NOT_FOUND, Result.REFUSED, Result.CLIENT_ERROR, Result.ERROR)


@dataclass(frozen=True)
class PeerRow:
    """One routing-table entry of this node's discovery, and what this node's relays know of
    the peer (see status_page.with_relay_state)."""

    node_id: str  # hex
    registry: str  # host:port of the peer's registry
    discovery_port: int
    last_seen_ago: float | None
    relay: str = "unused"  # ok | slow | quarantined | unused
    body_rate: float | None = None  # bytes per second
    header_latency: float | None = None  # seconds, smoothed


@dataclass(frozen=True)
class ImageRow:
    """One image of this node's store and the nodes holding its tag."""

    name: str
    digest: str
    nodes: Sequence[str]  # THIS_NODE first, then peer registry addresses


@dataclass(frozen=True)
class InflightRow:
    """One upstream fetch this node runs for the cluster, and who waits on it."""

    digest: str
    image: str  # registry/repository it is fetched for
    size: int
    written: int
    state: str  # growing, complete, failed
    started_at: float
    local_waiters: int
    peer_waiters: int
    resumes: int
    lease_lost: bool


@dataclass
class StatusData:
    """Everything one rendering of the page shows."""

    report: Mapping[str, Any]  # `peermirror status` report (status_report.build_report)
    now: float
    peers: Sequence[PeerRow] | None = None
    images: Sequence[ImageRow] | None = None
    pulls: Sequence[PullRecord] = ()
    requests: Mapping[CountKey, int] = field(default_factory=dict)
    inflight: Sequence[InflightRow] | None = None


def error_counts(requests: Mapping[CountKey, int]) -> dict[str, dict[str, int]]:
    """Finished manifest and blob requests that were not hits, by cache label and client."""
    counts = {CACHE_LABELS[r]: {"local": 0, "peer": 0} for r in ERROR_RESULTS}
    for key, n in requests.items():
        if key.result in ERROR_RESULTS:
            counts[CACHE_LABELS[key.result]]["peer" if key.from_peer else "local"] += n
    return counts


def _throughput(record: PullRecord) -> float | None:
    return record.bytes / record.seconds if record.bytes and record.seconds > 0 else None


def pull_rows(pulls: Iterable[PullRecord], now: float) -> list[dict[str, Any]]:
    """The recent pulls as JSON objects, newest first."""
    return [
        {
            "seconds_ago": round(max(0.0, now - p.at), 1),
            "ref": p.ref,
            "kind": p.kind.value,
            "result": CACHE_LABELS[p.result],
            "client": "peer" if p.from_peer else "local",
            "source": p.source,
            "bytes": p.bytes,
            "seconds": round(p.seconds, 4),
            "bytes_per_second": _throughput(p),
        }
        for p in sorted(pulls, key=lambda p: p.at, reverse=True)
    ]


def _inflight_row(row: InflightRow, now: float) -> dict[str, Any]:
    doc = dataclasses.asdict(row)
    doc["started_seconds_ago"] = round(max(0.0, now - doc.pop("started_at")), 1)
    return doc


def build_document(data: StatusData) -> dict[str, Any]:
    """The /status.json document described in the module docstring."""
    doc = dict(data.report)
    doc["page_schema"] = PAGE_SCHEMA_VERSION
    doc["peer_list"] = (
        None
        if data.peers is None
        else [
            {
                "node_id": p.node_id,
                "registry": p.registry,
                "discovery_port": p.discovery_port,
                "last_seen_seconds_ago": p.last_seen_ago,
                "relay": p.relay,
                "body_rate_bytes_per_second": p.body_rate,
                "header_latency_seconds": p.header_latency,
            }
            for p in data.peers
        ]
    )
    doc["images"] = (
        None
        if data.images is None
        else [{"name": i.name, "digest": i.digest, "nodes": list(i.nodes)} for i in data.images]
    )
    doc["recent_pulls"] = pull_rows(data.pulls, data.now)
    doc["errors"] = error_counts(data.requests)
    doc["inflight_fetches"] = (
        None if data.inflight is None else [_inflight_row(r, data.now) for r in data.inflight]
    )
    return doc


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.sub{color:#5b6475;margin-bottom:1em}
table{border-collapse:collapse;background:#fff;min-width:40%;box-shadow:0 1px 2px #0001}
th,td{text-align:left;padding:.3em .8em;border-bottom:1px solid #e3e6ec;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,monospace}
.UP,.hit{color:#17803d;font-weight:600}.DOWN,.error{color:#b42318;font-weight:600}
.NOT_READY,.miss,.peer_hit,.slow{color:#9a6700;font-weight:600}.quarantined{color:#b42318;font-weight:600}
.none{color:#5b6475;font-style:italic}
.cards{display:flex;gap:1em;flex-wrap:wrap}
.card{background:#fff;padding:.6em 1em;box-shadow:0 1px 2px #0001;min-width:9em}
.card b{display:block;font-size:1.5em}
.pair{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
td.t{white-space:nowrap}
"""


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _size(n: float | None) -> str:
    return "-" if n is None else format_bytes(n)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{format_duration(seconds)} ago"


def _short_ref(ref: str) -> str:
    """A digest reference with its digest cut to 12 hex digits (the full one is the title)."""
    name, at, digest = ref.partition("@")
    algorithm, colon, hexits = digest.partition(":")
    if not at or not colon or len(hexits) <= 12:
        return ref
    return f"{name}@{algorithm}:{hexits[:12]}…"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    """`rows` cells are already HTML (escaped by the caller)."""
    if not rows:
        return f'<p class="none">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: object, cls: str = "") -> str:
    attr = f' class="{_e(cls)}"' if cls else ""
    return f"<td{attr}>{_e(value)}</td>"


def _services(report: Mapping[str, Any]) -> str:
    rows = []
    for name in SERVICES:
        s = report["services"][name]
        uptime = s["uptime_seconds"]
        rows.append(
            [
                _td(name),
                _td(s["state"], s["state"]),
                _td(s["health"]),
                _td(s["version"]),
                _td("-" if uptime is None else f"{uptime:.0f}s", "n"),
                f"<td><code>{_e(s['address'])}</code></td>",
            ]
        )
    return _table(["Service", "State", "Health", "Version", "Uptime", "Address"], rows, "")


def _cards(report: Mapping[str, Any]) -> str:
    m = report["mirror"]
    cards = [
        ("peers", report["peers"]),
        ("advertised keys", report["advertised_keys"]),
        ("provider records", report["provider_records"]),
        ("pinned images", report["pinned_images"]),
        (f"hit rate, last {m['recent_window_seconds']:g}s", _rate(m["recent_hit_rate"])),
        ("hit rate since start", _rate(m["hit_rate"])),
    ]
    return (
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{_e(v)}</b>{_e(label)}</div>' for label, v in cards)
        + "</div>"
    )


def _peers(peers: Sequence[PeerRow] | None) -> str:
    if peers is None:
        return '<p class="none">discovery did not answer</p>'
    rows = [
        [
            f"<td><code>{_e(p.registry)}</code></td>",
            f"<td><code>{_e(p.node_id[:16])}</code></td>",
            _td(p.discovery_port, "n"),
            _td(_ago(p.last_seen_ago)),
            _td(p.relay, p.relay),
            _td("-" if p.body_rate is None else _size(p.body_rate) + "/s", "n"),
            _td("-" if p.header_latency is None else f"{p.header_latency * 1000:.0f} ms", "n"),
        ]
        for p in peers
    ]
    headers = ["Registry", "Node id", "Discovery port", "Last seen", "Relay", "Body rate"]
    return _table([*headers, "Header latency"], rows, "no peers known")


def _images(images: Sequence[ImageRow] | None) -> str:
    if images is None:
        return '<p class="none">content store not open</p>'
    rows = [
        [
            _td(i.name),
            f"<td><code>{_e(i.digest[:19])}</code></td>",
            "<td>" + ", ".join(_e(n) for n in i.nodes) + "</td>",
        ]
        for i in images
    ]
    return _table(["Image", "Digest", "Present on"], rows, "no images in this node's store")


def _pulls(rows: Sequence[Mapping[str, Any]]) -> str:
    cells = [
        [
            _td(_ago(r["seconds_ago"]), "t"),
            f'<td class="t" title="{_e(r["ref"])}"><code>{_e(_short_ref(r["ref"]))}</code></td>',
            _td(r["kind"]),
            _td(r["result"], r["result"]),
            _td(r["client"]),
            _td(r["source"] or "-"),
            _td(_size(r["bytes"]), "n t"),
            _td(f"{r['seconds'] * 1000:.1f} ms", "n t"),
            _td(
                "-" if r["bytes_per_second"] is None else _size(r["bytes_per_second"]) + "/s",
                "n t",
            ),
        ]
        for r in rows
    ]
    headers = ["When", "Reference", "Kind", "Result", "Client", "Source", "Bytes", "Time", "Rate"]
    return _table(headers, cells, "no pulls since start")


def _errors(errors: Mapping[str, Mapping[str, int]]) -> str:
    rows = [[_td(label), _td(c["local"], "n"), _td(c["peer"], "n")] for label, c in errors.items()]
    return _table(["Result", "Local clients", "Peers"], rows, "")


def _inflight(rows: Sequence[Mapping[str, Any]] | None) -> str:
    if rows is None:
        return '<p class="none">shared first pulls are off on this node</p>'
    cells = [
        [
            f'<td title="{_e(r["digest"])}"><code>{_e(r["digest"][:19])}</code></td>',
            _td(r["image"]),
            _td(f"{_size(r['written'])} of {_size(r['size'])}", "n t"),
            _td(r["state"]),
            _td(_ago(r["started_seconds_ago"]), "t"),
            _td(r["local_waiters"], "n"),
            _td(r["peer_waiters"], "n"),
            _td(r["resumes"], "n"),
            _td("lost" if r["lease_lost"] else "held"),
        ]
        for r in rows
    ]
    headers = [
        "Digest",
        "Image",
        "Fetched",
        "State",
        "Started",
        "Local waiters",
        "Peer waiters",
        "Resumes",
        "Lease",
    ]
    return _table(headers, cells, "no upstream fetch in flight")


def render_html(data: StatusData) -> str:
    """The whole page: one self-contained HTML document."""
    doc = build_document(data)
    report = data.report
    state = "ok" if report["ok"] else "NOT OK"
    summary = render_text(report).splitlines()[-1]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>peermirror {_e(report['node'])}</title><style>{_CSS}</style></head><body>"
        f'<h1>peermirror node <span id="node">{_e(report["node"])}</span>: {_e(state)}</h1>'
        f'<div class="sub">{_e(summary)}</div>'
        f'<section id="overview">{_cards(report)}</section>'
        '<div class="pair">'
        f'<div><h2>Services</h2><section id="services">{_services(report)}</section></div>'
        f'<div><h2>Peers</h2><section id="peers">{_peers(data.peers)}</section></div>'
        "</div>"
        '<div class="pair">'
        f'<div><h2>Images</h2><section id="images">{_images(data.images)}</section></div>'
        f'<div><h2>Errors since start</h2><section id="errors">{_errors(doc["errors"])}</section>'
        "</div></div>"
        "<h2>In-flight upstream fetches</h2>"
        f'<section id="inflight">{_inflight(doc["inflight_fetches"])}</section>'
        f'<h2>Recent pulls</h2><section id="pulls">{_pulls(doc["recent_pulls"])}</section>'
        "</body></html>\n"
    )
