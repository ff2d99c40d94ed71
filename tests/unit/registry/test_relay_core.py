"""The relay core without sockets: every branch driven by events, the actions checked."""

from __future__ import annotations

import hashlib
import json

import pytest

from services.common.oci.media_types import OCI_INDEX, OCI_MANIFEST
from services.registry.headers import DIGEST_HEADER
from services.registry.mirror.hedging import Peer
from services.registry.mirror.relay_core import (
    AbortClient,
    Action,
    BlobRelay,
    Finish,
    Prove,
    QuarantinePeer,
    RankDown,
    RatePolicy,
    RecordRate,
    Resume,
    Send,
    manifest_answer,
)
from services.registry.mirror.verify import DigestMismatchError, PeerAnswerError
from services.registry.ranges import ByteRange

BLOB = bytes(range(256)) * 4096  # 1 MiB
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
A, B, C = Peer("10.0.0.1", 6443, "aa"), Peer("10.0.0.2", 6443, "bb"), Peer("10.0.0.3", 6443, "cc")
POLICY = RatePolicy(
    rate_window=1.0,
    min_peer_rate=1000.0,
    slow_peer_ratio=0.2,
    peer_attempt_timeout=100.0,
    peer_timeout=5.0,
)


def _whole(size: int = len(BLOB)) -> ByteRange:
    return ByteRange(0, size - 1, size)


def _relay(window: ByteRange | None = None, blob: bytes = BLOB) -> BlobRelay:
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    return BlobRelay(digest, len(blob), window or _whole(len(blob)), POLICY)


def _sent(actions: list[Action]) -> bytes:
    return b"".join(bytes(a.data) for a in actions if isinstance(a, Send | Finish))


def _feed(relay: BlobRelay, data: bytes, now: float, piece: int = 64 * 1024) -> list[Action]:
    actions: list[Action] = []
    for i in range(0, len(data), piece):
        actions += relay.received(data[i : i + piece], now)
    return actions


def test_a_whole_blob_streams_and_its_last_piece_waits_for_the_digest() -> None:
    relay = _relay()
    assert relay.begin(A, 0.0) == []
    first = relay.received(BLOB[:1000], 0.1)
    assert first == [Send(BLOB[:1000])]  # sent as it arrives, no batching
    rest = relay.received(BLOB[1000:], 0.2)
    assert isinstance(rest[-1], Finish)
    assert rest[-1].data == BLOB[1000:]  # the final piece went out only with the verdict
    assert _sent(first + rest) == BLOB
    assert relay.done
    samples = [a for a in rest if isinstance(a, RecordRate)]
    assert [a.peer for a in samples] == [A]
    assert samples[0].rate == pytest.approx(len(BLOB) / 0.2)


def test_a_peer_ending_early_is_resumed_by_range_from_the_next_peer() -> None:
    relay = _relay()
    relay.begin(A, 0.0)
    out = _feed(relay, BLOB[:300_000], 0.1)
    out += relay.ended(0.2)
    assert out[-1] == Resume(300_000, len(BLOB) - 1, "body ended at byte 300000")
    assert relay.peer is None
    relay.begin(B, 0.3)
    out += _feed(relay, BLOB[300_000:], 0.4)
    assert isinstance(out[-1], Finish)
    assert _sent(out) == BLOB


def test_a_failure_or_stall_resumes_and_blames_nobody() -> None:
    relay = _relay()
    relay.begin(A, 0.0)
    relay.received(BLOB[:10], 0.0)
    failed = relay.failed("ConnectionResetError: reset", 0.1)
    assert failed == [Resume(10, len(BLOB) - 1, "ConnectionResetError: reset")]
    relay.begin(B, 1.0)
    assert relay.next_check(1.0) == pytest.approx(1.0)  # the rate window comes first
    stalled = relay.tick(6.0)
    assert stalled == [Resume(10, len(BLOB) - 1, "sent no body bytes for 5 s")]
    assert not any(isinstance(a, QuarantinePeer | RankDown) for a in failed + stalled)


def test_a_drip_feeding_peer_is_ranked_down_and_left_at_its_offset() -> None:
    relay = _relay()
    relay.begin(A, 0.0)
    relay.received(BLOB[:5000], 0.0)
    # One byte per 0.3 s never trips the stall timer; the rate over a window does.
    actions: list[Action] = []
    for i in range(1, 9):
        if not relay.peer:
            break
        actions += relay.received(BLOB[5000 + i - 1 : 5000 + i], 0.3 * i)
    slow = [a for a in actions if isinstance(a, RankDown)]
    assert len(slow) == 1
    assert slow[0].peer == A
    assert "below the floor" in slow[0].reason
    assert slow[0].rule == "floor"
    resume = actions[-1]
    assert isinstance(resume, Resume)
    assert resume.start == relay.offset
    assert 5000 < resume.start <= 5008
    # The bytes it did send reached the client as they came.
    assert _sent(actions) == BLOB[5000 : resume.start]


def test_a_peer_far_slower_than_another_provider_is_left() -> None:
    relay = _relay()
    relay.begin(A, 0.0, reference_rate=100e6)
    actions = relay.received(BLOB[:100_000], 1.0)  # 100 kB/s, above the floor
    assert isinstance(actions[0], Send)
    assert isinstance(actions[1], RankDown)
    assert "another provider" in actions[1].reason
    assert actions[1].rule == "ratio"
    assert isinstance(actions[2], Resume)


def test_a_congested_peer_is_left_early_when_another_provider_is_known() -> None:
    # A link 100x slower than another provider's must not hold the pull for a whole window:
    # it is judged after a fifth of it (here 0.2 s of the 1 s window).
    relay = _relay()
    relay.begin(A, 0.0, reference_rate=100e6)
    assert relay.next_check(0.0) == pytest.approx(0.2)
    actions = relay.received(BLOB[:10_000], 0.19)
    assert actions == [Send(BLOB[:10_000])]  # too early to judge
    actions = relay.tick(0.2)  # 50 kB/s against 100 MB/s
    assert isinstance(actions[0], RankDown)
    assert "first 0.2 s" in actions[0].reason
    assert actions[0].rule == "early"
    assert actions[1] == Resume(10_000, len(BLOB) - 1, actions[0].reason)


def test_the_early_judgement_is_stricter_and_needs_a_known_provider() -> None:
    # At a tenth of the reference (under the window's ratio of 0.2, over the early test's
    # 0.05) the peer keeps its whole first window; the window's own test then leaves it.
    relay = _relay()
    relay.begin(A, 0.0, reference_rate=1e6)
    assert relay.received(BLOB[:20_000], 0.2) == [Send(BLOB[:20_000])]
    assert relay.next_check(0.2) == pytest.approx(0.8)
    actions = relay.received(BLOB[20_000:100_000], 1.0)
    assert isinstance(actions[1], RankDown)
    assert "another provider" in actions[1].reason
    # With no other provider known only the floor applies, once a window is over.
    alone = _relay()
    alone.begin(A, 0.0)
    assert alone.next_check(0.0) == pytest.approx(1.0)
    assert alone.received(BLOB[:2_000], 0.5) == [Send(BLOB[:2_000])]
    # After the first window the early test is not repeated: the window's rule governs.
    later = _relay()
    later.begin(A, 0.0, reference_rate=1e6)
    later.received(BLOB[:300_000], 1.0)  # kept pace
    assert later.next_check(1.0) == pytest.approx(1.0)
    assert later.received(BLOB[300_000:300_010], 1.3) == [Send(BLOB[300_000:300_010])]


def test_a_rate_learned_during_an_attempt_is_what_the_peer_is_judged_against() -> None:
    relay = _relay()
    relay.begin(A, 0.0)  # nothing known yet: only the floor applies
    assert relay.next_check(0.0) == pytest.approx(1.0)
    relay.refer_to(100e6)  # another relay measured a fast provider meanwhile
    assert relay.next_check(0.1) == pytest.approx(0.1)
    actions = relay.received(BLOB[:10_000], 0.3)
    assert isinstance(actions[1], RankDown) and actions[1].rule == "early"
    # Known no longer (no provider left that could take over): the ratio rules stop.
    kept = _relay()
    kept.begin(A, 0.0, reference_rate=100e6)
    kept.refer_to(None)
    assert kept.received(BLOB[:10_000], 0.3) == [Send(BLOB[:10_000])]
    assert kept.received(BLOB[10_000:20_000], 1.0) == [
        Send(BLOB[10_000:20_000]),
        RecordRate(A, 20_000.0),
    ]


def test_a_peer_keeping_pace_gets_rate_samples_not_judgements() -> None:
    relay = _relay()
    relay.begin(A, 0.0, reference_rate=100_000.0)
    actions = relay.received(BLOB[:50_000], 1.0)  # half the reference, above the ratio
    assert actions == [Send(BLOB[:50_000]), RecordRate(A, 50_000.0)]


def test_the_attempt_deadline_leaves_even_a_steady_peer() -> None:
    relay = BlobRelay(
        DIGEST,
        len(BLOB),
        _whole(),
        RatePolicy(rate_window=1.0, min_peer_rate=1.0, peer_attempt_timeout=3.0),
    )
    relay.begin(A, 0.0)
    for t in (1.0, 2.0):
        relay.received(BLOB[int(t) * 10 : int(t) * 10 + 10], t)
    actions = relay.tick(3.0)
    assert isinstance(actions[0], RankDown)
    assert "took over 3 s" in actions[0].reason
    assert actions[0].rule == "deadline"
    assert actions[1] == Resume(relay.offset, len(BLOB) - 1, actions[0].reason)


def test_a_wrong_body_from_one_peer_quarantines_it_and_cuts_the_client() -> None:
    relay = _relay()
    relay.begin(A, 0.0)
    bad = bytearray(BLOB)
    bad[500_000] ^= 0xFF
    actions = _feed(relay, bytes(bad), 0.1)
    assert not any(isinstance(a, Finish) for a in actions)
    assert actions[-2:] == [
        QuarantinePeer(A, f"relayed body does not hash to {DIGEST}"),
        AbortClient(f"relayed body does not hash to {DIGEST}"),
    ]
    assert len(_sent(actions)) < len(BLOB)


def _mixed_failure(bad_first: bool) -> Prove:
    """A body A and B contributed to, one of them corrupting its span."""
    relay = _relay()
    relay.begin(A, 0.0)
    head = bytearray(BLOB[:400_000])
    tail = bytearray(BLOB[400_000:])
    (head if bad_first else tail)[100] ^= 0xFF
    _feed(relay, bytes(head), 0.1)
    relay.ended(0.1)
    relay.begin(B, 0.2)
    actions = _feed(relay, bytes(tail), 0.3)
    assert isinstance(actions[-1], AbortClient)
    assert not any(isinstance(a, QuarantinePeer) for a in actions)
    prove = actions[-2]
    assert isinstance(prove, Prove)
    return prove


@pytest.mark.parametrize("bad_first", [True, False])
def test_several_contributors_are_judged_only_on_proof(bad_first: bool) -> None:
    evidence = _mixed_failure(bad_first).evidence
    liar, honest = (A, B) if bad_first else (B, A)
    assert evidence.suspects() == [B, A]
    # An honest full read convicts the span that differs from it, and only that one.
    check = evidence.check(honest)
    for i in range(0, len(BLOB), 100_000):
        check.update(BLOB[i : i + 100_000])
    assert check.verdict() == liar
    # A full read that is itself wrong convicts its reader (the whole body is its own).
    wrong = bytearray(BLOB)
    wrong[7] ^= 0xFF
    check = evidence.check(liar)
    check.update(bytes(wrong))
    assert check.verdict() == liar
    # An incomplete read proves nothing.
    check = evidence.check(liar)
    check.update(BLOB[:1000])
    assert check.verdict() is None


def test_a_client_range_is_cut_from_the_whole_verified_blob() -> None:
    relay = _relay(ByteRange(1000, 1999, len(BLOB)))
    relay.begin(A, 0.0)
    out = _feed(relay, BLOB[:1500], 0.1, piece=700)
    assert _sent(out) == BLOB[1000:1500]  # sent as read, nothing reached byte 1999 yet
    out += relay.ended(0.1)
    relay.begin(C, 0.2)
    out += _feed(relay, BLOB[1500:], 0.3)
    assert isinstance(out[-1], Finish)
    assert out[-1].data == BLOB[1500:2000]  # the piece reaching byte 1999 waited
    assert _sent(out) == BLOB[1000:2000]  # bytes past the window were read and hashed only


def test_a_range_from_a_corrupt_blob_is_never_completed() -> None:
    relay = _relay(ByteRange(0, 99, len(BLOB)))
    relay.begin(A, 0.0)
    bad = bytearray(BLOB)
    bad[-1] ^= 0xFF  # outside the window
    actions = _feed(relay, bytes(bad), 0.1)
    assert _sent(actions) == b""  # the whole window is its final piece, held
    assert isinstance(actions[-1], AbortClient)


def test_an_empty_blob_finishes_on_begin() -> None:
    relay = _relay(ByteRange(0, -1, 0), blob=b"")
    assert relay.begin(A, 0.0) == [Finish(b"")]


def test_no_peer_left_aborts_and_events_out_of_order_are_refused() -> None:
    relay = _relay()
    with pytest.raises(RuntimeError):
        relay.received(b"x", 0.0)
    relay.begin(A, 0.0)
    relay.received(BLOB[:10], 0.0)
    relay.failed("reset", 0.1)
    assert relay.exhausted("no provider found") == [
        AbortClient("no peer could continue at byte 10: no provider found")
    ]
    assert relay.tick(1.0) == []


def test_more_bytes_than_announced_is_a_failure() -> None:
    relay = _relay(blob=b"abc")
    relay.begin(A, 0.0)
    actions = relay.received(b"abcd", 0.0)
    assert actions == [Resume(0, 2, "sent more than the 3 bytes announced")]


# --- manifests --------------------------------------------------------------------------------


def _manifest(media_type: str | None) -> tuple[bytes, str]:
    doc: dict[str, object] = {"schemaVersion": 2, "config": {}, "layers": []}
    if media_type is not None:
        doc["mediaType"] = media_type
    body = json.dumps(doc).encode()
    return body, "sha256:" + hashlib.sha256(body).hexdigest()


def test_a_manifest_is_typed_by_the_media_type_its_body_declares() -> None:
    body, digest = _manifest(OCI_MANIFEST)
    plain = {"Content-Type": "application/octet-stream"}
    answer = manifest_answer(digest, plain, body, digest_header=DIGEST_HEADER)
    assert answer.media_type == OCI_MANIFEST
    with pytest.raises(PeerAnswerError, match="typed"):
        manifest_answer(digest, {"Content-Type": OCI_INDEX}, body, digest_header=DIGEST_HEADER)


def test_a_manifest_without_a_declared_type_takes_the_header_or_its_shape() -> None:
    body, digest = _manifest(None)
    typed = manifest_answer(digest, {"Content-Type": OCI_INDEX}, body, digest_header=DIGEST_HEADER)
    assert typed.media_type == OCI_INDEX
    shaped = manifest_answer(digest, {}, body, digest_header=DIGEST_HEADER)
    assert shaped.media_type == OCI_MANIFEST


def test_a_manifest_is_checked_against_its_digest_or_the_tag_answer() -> None:
    body, digest = _manifest(OCI_MANIFEST)
    with pytest.raises(DigestMismatchError):
        manifest_answer("sha256:" + "0" * 64, {}, body, digest_header=DIGEST_HEADER)
    by_tag = manifest_answer(None, {DIGEST_HEADER: digest}, body, digest_header=DIGEST_HEADER)
    assert by_tag.digest == digest
    with pytest.raises(PeerAnswerError, match="no"):
        manifest_answer(None, {}, body, digest_header=DIGEST_HEADER)
    with pytest.raises(PeerAnswerError, match="not a manifest"):
        manifest_answer(
            "sha256:" + hashlib.sha256(b"{}").hexdigest(), {}, b"{}", digest_header=DIGEST_HEADER
        )
