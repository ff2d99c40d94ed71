"""The status report: states, hit rates, the JSON document and its text rendering."""

from __future__ import annotations

from services.common.status.report import (
    Observed,
    ServiceObservation,
    build_report,
    exit_code,
    hit_rate,
    render_text,
    state_of,
)


def observed(pinner_health: str = "SERVING") -> Observed:
    return Observed(
        node="n1",
        now=10_000.0,
        services={
            "registry": ServiceObservation(
                "127.0.0.1:5004", "SERVING", "127.0.0.1:5007", "1.2", 9_000.0
            ),
            "discovery": ServiceObservation("127.0.0.1:5002", "NOT_SERVING", None, None, 9_990.0),
            "pinner": ServiceObservation("127.0.0.1:5003", pinner_health),
        },
        peers=4,
        provider_records=12,
        advertised_keys=30,
        pinned_images=None,
        leases={"held": 1, "records": 3, "granted": 5, "expired": 2, "lost": 0, "waits": 4},
        since_start={"hit": 1, "peer_hit": 2, "miss": 1, "refused": 7, "client_error": 3},
        recent={},
        recent_window=300.0,
    )


def test_states() -> None:
    assert state_of("SERVING") == "UP"
    assert state_of("NOT_SERVING") == "NOT_READY"
    assert state_of("SERVICE_UNKNOWN") == "NOT_READY"
    assert state_of("UNREACHABLE: UNAVAILABLE") == "DOWN"


def test_hit_rate_leaves_out_refusals_and_client_errors() -> None:
    assert hit_rate({"hit": 1, "peer_hit": 2, "miss": 1, "refused": 7, "client_error": 3}) == (
        4,
        0.75,
    )
    assert hit_rate({"error": 2}) == (2, 0.0)
    assert hit_rate({"refused": 2}) == (0, None)
    assert hit_rate(None) == (None, None)


def test_report_document() -> None:
    report = build_report(observed())
    assert report["schema"] == 1
    assert report["ok"] is False  # discovery is not ready
    assert report["services"]["registry"] == {
        "state": "UP",
        "health": "SERVING",
        "address": "127.0.0.1:5004",
        "metrics_address": "127.0.0.1:5007",
        "version": "1.2",
        "uptime_seconds": 1000.0,
    }
    assert report["services"]["discovery"]["state"] == "NOT_READY"
    assert report["services"]["pinner"]["uptime_seconds"] is None
    assert report["mirror"] == {
        "requests": 4,
        "hit_rate": 0.75,
        "recent_requests": 0,
        "recent_hit_rate": None,
        "recent_window_seconds": 300.0,
    }
    assert exit_code(report) == 1


def test_all_up_exits_zero() -> None:
    obs = observed()
    obs.services["discovery"].health = "SERVING"
    assert exit_code(build_report(obs)) == 0


def test_text_shows_down_and_figures() -> None:
    text = render_text(build_report(observed("UNREACHABLE: UNAVAILABLE")))
    lines = text.splitlines()
    assert lines[0] == "node n1: NOT OK"
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["pinner"][:3] == ["pinner", "DOWN", "UNREACHABLE:"]
    assert rows["registry"][1:5] == ["UP", "SERVING", "1.2", "16m40s"]
    assert rows["discovery"][4] == "10s"
    assert "peers 4, provider records 12, advertised keys 30, pinned images -" in text
    assert "last 300s: no requests; since start: 75.0% of 4" in text
    assert "fetch leases: held 1, deciding 3 (granted 5, expired 2), lost 0, waits 4" in text


def test_lease_figures_in_the_document_and_absent_without_an_answer() -> None:
    assert build_report(observed())["leases"] == {
        "held": 1,
        "records": 3,
        "granted": 5,
        "expired": 2,
        "lost": 0,
        "waits": 4,
    }
    obs = observed()
    obs.leases = None
    report = build_report(obs)
    assert report["leases"] is None
    assert "fetch leases" not in render_text(report)
