"""In-flight fetches and their waiters on the status page (/status.json and /status)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from services.common.status.observe import inflight_from_metrics
from services.common.status.report import (
    SERVICES,
    Observed,
    ServiceObservation,
    build_report,
    render_text,
)
from services.registry.inflight.coordinator import Coordinator, InflightSettings
from services.registry.inflight.ports import Holder
from services.registry.inflight.spool import SpoolPool
from services.registry.status_page import inflight_rows
from services.registry.status_view import InflightRow, StatusData, build_document, render_html
from tests.harness.fake_inflight import FakeUpstream
from tests.harness.fake_router import FakeRouter, LeaseTable

NOW = 10_000.0


def _data(inflight: list[InflightRow] | None) -> StatusData:
    report = build_report(
        Observed(
            node="n1",
            now=NOW,
            services={
                name: ServiceObservation("127.0.0.1:1", "SERVING")
                for name in ("registry", "discovery", "pinner")
            },
        )
    )
    return StatusData(report=report, now=NOW, inflight=inflight)


ROW = InflightRow(
    digest="sha256:" + "ab" * 32,
    image="docker.io/library/<app>",
    size=4 << 20,
    written=1 << 20,
    state="growing",
    started_at=NOW - 3,
    local_waiters=2,
    peer_waiters=5,
    resumes=1,
    lease_lost=False,
)


def test_document_lists_fetches_and_their_waiters() -> None:
    doc = build_document(_data([ROW]))
    assert doc["inflight_fetches"] == [
        {
            "digest": ROW.digest,
            "image": "docker.io/library/<app>",
            "size": 4 << 20,
            "written": 1 << 20,
            "state": "growing",
            "started_seconds_ago": 3.0,
            "local_waiters": 2,
            "peer_waiters": 5,
            "resumes": 1,
            "lease_lost": False,
        }
    ]
    assert build_document(_data(None))["inflight_fetches"] is None


def test_page_shows_the_fetch_escaped_and_says_when_off() -> None:
    page = render_html(_data([ROW]))
    section = page[page.index('<section id="inflight">') :]
    assert "docker.io/library/&lt;app&gt;" in section and "<app>" not in section
    assert "1.0 MiB of 4.0 MiB" in section
    assert "no upstream fetch in flight" in render_html(_data([]))
    assert "shared first pulls are off" in render_html(_data(None))


async def test_rows_come_from_the_coordinators_running_fetches(tmp_path: Path) -> None:
    upstream = FakeUpstream(gate=asyncio.Event())
    digest = upstream.add_blob(os.urandom(300_000))
    pool = SpoolPool(tmp_path, 1 << 20, grace_s=60)
    pool.open()
    coordinator = Coordinator(
        InflightSettings(),
        pool,
        LeaseTable().client(Holder("127.0.0.1", 1)),
        upstream,
        FakeRouter(),
    )
    await coordinator.claim_blob("docker.io", "library/app", digest)
    await coordinator.claim_blob("docker.io", "library/app", digest)
    assert await coordinator.peer_spool(digest, 1.0) is not None
    (row,) = inflight_rows(coordinator)
    assert (row.digest, row.image, row.size, row.state) == (
        digest,
        "docker.io/library/app",
        300_000,
        "growing",
    )
    assert (row.local_waiters, row.peer_waiters) == (1, 1)
    await coordinator.close()


def test_cli_report_counts_fetches_and_waiters_from_the_registry_metrics() -> None:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {
        "peermirror_inflight_fetches": [({}, 2.0)],
        "peermirror_inflight_coalesced_waiters_total": [
            ({"waiter": "local"}, 3.0),
            ({"waiter": "peer"}, 9.0),
            ({"waiter": "remote_holder"}, 1.0),
        ],
    }
    obs = _data(None).report  # a report without the registry's metrics
    assert obs["inflight"] == {"fetches": None, "coalesced_waiters": None}
    assert "shared first pulls" not in render_text(obs)
    observed = Observed(
        node="n1",
        now=NOW,
        services={n: ServiceObservation("127.0.0.1:1", "SERVING") for n in SERVICES},
    )
    inflight_from_metrics(observed, samples)
    report = build_report(observed)
    assert report["inflight"] == {"fetches": 2, "coalesced_waiters": 13}
    assert render_text(report).splitlines()[-1] == (
        "shared first pulls: 2 upstream fetches in flight, 13 coalesced waiters since start"
    )
