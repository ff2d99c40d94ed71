"""The status page's pure part: the JSON document and the self-contained, escaped HTML."""

from __future__ import annotations

import dataclasses
import html.parser
import json

from services.common.status.report import Observed, ServiceObservation, build_report
from services.common.store.protocol import Descriptor, ImageRecord
from services.registry.mirror.hedging import Peer, PeerBook
from services.registry.mirror.quarantine import Quarantine
from services.registry.stats import CountKey, PullRecord, RequestKind, Result
from services.registry.status_page import image_rows, with_relay_state
from services.registry.status_view import (
    THIS_NODE,
    ImageRow,
    PeerRow,
    StatusData,
    build_document,
    error_counts,
    pull_rows,
    render_html,
)

NOW = 10_000.0


def report() -> dict[str, object]:
    return build_report(
        Observed(
            node="node<1>",
            now=NOW,
            services={
                "registry": ServiceObservation("127.0.0.1:5004", "SERVING", None, "1.2", 9_000.0),
                "discovery": ServiceObservation("127.0.0.1:5002", "SERVING"),
                "pinner": ServiceObservation("127.0.0.1:5003", "UNREACHABLE: UNAVAILABLE"),
            },
            peers=2,
            since_start={"hit": 3, "miss": 1},
        )
    )


def pull(at: float, result: Result, source: str, size: int, seconds: float) -> PullRecord:
    return PullRecord(
        at=at,
        ref="docker.io/library/app:1",
        kind=RequestKind.BLOB,
        result=result,
        from_peer=False,
        source=source,
        bytes=size,
        seconds=seconds,
    )


def data() -> StatusData:
    return StatusData(
        report=report(),
        now=NOW,
        peers=[PeerRow("ab" * 32, "10.0.0.2:5000", 5001, 3.0)],
        images=[
            ImageRow(
                "docker.io/library/app:1<script>",
                "sha256:" + "c" * 64,
                [THIS_NODE, "10.0.0.2:5000"],
            )
        ],
        pulls=[
            pull(NOW - 50, Result.LOCAL_HIT, "local", 1000, 0.5),
            pull(NOW - 5, Result.PEER_HIT, "10.0.0.2:5000", 4 * 1024 * 1024, 2.0),
            pull(NOW - 1, Result.NOT_FOUND, "", 0, 0.01),
        ],
        requests={
            CountKey(RequestKind.BLOB, Result.NOT_FOUND, False): 2,
            CountKey(RequestKind.MANIFEST, Result.REFUSED, True): 5,
            CountKey(RequestKind.BLOB, Result.LOCAL_HIT, False): 9,
        },
    )


class _Collect(html.parser.HTMLParser):
    """Text of the page and every tag/attribute that could load something from elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") or (value or "").startswith(("http:", "https:", "//")):
                self.external.append(f"{tag} {name}={value}")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Collect:
    parser = _Collect()
    parser.feed(page)
    return parser


def test_document_adds_peers_images_pulls_and_errors_to_the_cli_report() -> None:
    doc = build_document(data())
    # The CLI's report is there unchanged.
    for key, value in report().items():
        assert doc[key] == value
    assert doc["peer_list"] == [
        {
            "node_id": "ab" * 32,
            "registry": "10.0.0.2:5000",
            "discovery_port": 5001,
            "last_seen_seconds_ago": 3.0,
            "relay": "unused",
            "body_rate_bytes_per_second": None,
            "header_latency_seconds": None,
        }
    ]
    assert doc["images"][0]["nodes"] == [THIS_NODE, "10.0.0.2:5000"]
    assert [p["seconds_ago"] for p in doc["recent_pulls"]] == [1.0, 5.0, 50.0]
    peer_pull = doc["recent_pulls"][1]
    assert peer_pull["result"] == "peer_hit"
    assert peer_pull["source"] == "10.0.0.2:5000"
    assert peer_pull["bytes_per_second"] == 2 * 1024 * 1024
    assert doc["recent_pulls"][0]["bytes_per_second"] is None
    assert doc["errors"]["miss"] == {"local": 2, "peer": 0}
    assert doc["errors"]["refused"] == {"local": 0, "peer": 5}
    json.dumps(doc)  # serialisable as is


def test_error_counts_lists_every_error_result_even_at_zero() -> None:
    assert error_counts({}) == {
        "miss": {"local": 0, "peer": 0},
        "refused": {"local": 0, "peer": 0},
        "client_error": {"local": 0, "peer": 0},
        "error": {"local": 0, "peer": 0},
    }


def test_pull_rows_are_newest_first_and_never_in_the_future() -> None:
    rows = pull_rows([pull(NOW + 3, Result.LOCAL_HIT, "local", 1, 1.0)], NOW)
    assert rows[0]["seconds_ago"] == 0.0


def test_html_shows_each_part_and_escapes_data() -> None:
    page = render_html(data())
    parsed = parse(page)
    text = "".join(parsed.text)
    assert "node<1>" in text  # shown as text...
    assert "<1>" not in page  # ...because it was escaped
    assert "script" not in parsed.tags
    assert "docker.io/library/app:1<script>" in text
    assert "10.0.0.2:5000" in text
    assert "abababababababab" in text
    assert "peer_hit" in text and "2.0 MiB/s" in text
    assert "UNREACHABLE: UNAVAILABLE" in text
    assert "NOT OK" in text


def test_html_has_no_external_assets() -> None:
    parsed = parse(render_html(data()))
    assert parsed.external == []
    assert not {"script", "link", "img", "iframe"} & set(parsed.tags)


def test_html_says_what_is_missing() -> None:
    empty = StatusData(report=report(), now=NOW)
    text = "".join(parse(render_html(empty)).text)
    assert "discovery did not answer" in text
    assert "content store not open" in text
    assert "no pulls since start" in text
    no_rows = StatusData(report=report(), now=NOW, peers=[], images=[])
    text = "".join(parse(render_html(no_rows)).text)
    assert "no peers known" in text
    assert "no images in this node's store" in text


def test_image_rows_put_this_node_first_and_sort_by_name() -> None:
    target = Descriptor(digest="sha256:" + "1" * 64, size=10)
    rows = image_rows(
        [ImageRecord("docker.io/b:1", target), ImageRecord("docker.io/a:1", target)],
        {"docker.io/b:1": ["10.0.0.3:5000"]},
    )
    assert [(r.name, list(r.nodes)) for r in rows] == [
        ("docker.io/a:1", [THIS_NODE]),
        ("docker.io/b:1", [THIS_NODE, "10.0.0.3:5000"]),
    ]


def test_html_shortens_digest_references_and_keeps_the_full_one_as_title() -> None:
    digest = "sha256:" + "d" * 64
    record = PullRecord(
        at=NOW,
        ref=f"docker.io/library/app@{digest}",
        kind=RequestKind.BLOB,
        result=Result.LOCAL_HIT,
        from_peer=False,
        source="local",
        bytes=10,
        seconds=0.1,
    )
    page = render_html(StatusData(report=report(), now=NOW, pulls=[record]))
    text = "".join(parse(page).text)
    assert "docker.io/library/app@sha256:dddddddddddd…" in text
    assert digest not in text
    assert f'title="docker.io/library/app@{digest}"' in page


def test_peer_rows_show_what_this_node_knows_of_each_peer_as_a_relay_source() -> None:
    clock = [100.0]
    book = PeerBook(clock=lambda: clock[0])
    quarantine: Quarantine[str] = Quarantine(60.0, clock=lambda: clock[0])
    fast, slow, liar = (Peer(f"10.0.0.{i}", 6443, f"{i:02x}" * 32) for i in (1, 2, 3))
    book.observe(fast, 0.004)
    book.observe_rate(fast, 400e6)
    book.rank_down(slow, 2e6)
    book.observe_rate(liar, 300e6)
    quarantine.add(liar.identity)
    rows = [
        PeerRow(p.node_id, str(p), 5001, 1.0)
        for p in (fast, slow, liar, Peer("10.0.0.4", 6443, "04" * 32))
    ]
    shown = with_relay_state(rows, book, quarantine)
    assert [(r.relay, r.body_rate, r.header_latency) for r in shown] == [
        ("ok", 400e6, 0.004),
        ("slow", 2e6, None),  # the rate it was left at
        ("quarantined", 300e6, None),
        ("unused", None, None),
    ]
    # A rate older than the book believes is not shown as the peer's rate.
    clock[0] += 3600
    assert with_relay_state(rows[:1], book, quarantine)[0].body_rate is None
    page = render_html(dataclasses.replace(data(), peers=shown))
    text = "".join(parse(page).text)
    assert "quarantined" in text and "slow" in text and "381.5 MiB/s" in text
    assert "4 ms" in text
