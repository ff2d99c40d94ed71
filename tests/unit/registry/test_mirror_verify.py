"""Checks the mirror applies to peers' answers: digests, Content-Range, blob headers (pure)."""

from __future__ import annotations

import hashlib

import pytest

from services.common.oci.grammar import GrammarError
from services.registry.mirror.verify import (
    PeerAnswerError,
    RunningHash,
    check_blob_answer,
    parse_content_range,
)
from services.registry.ranges import ByteRange

DATA = b"peermirror" * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
OTHER = "sha256:" + "0" * 64
H = "Docker-Content-Digest"


def test_running_hash_over_pieces() -> None:
    running = RunningHash(DIGEST)
    for i in range(0, len(DATA), 333):
        running.update(DATA[i : i + 333])
    assert running.matches()
    assert running.size == len(DATA)
    running.update(b"x")
    assert not running.matches()


def test_sha512_is_supported_and_bad_digests_are_refused() -> None:
    digest = "sha512:" + hashlib.sha512(DATA).hexdigest()
    running = RunningHash(digest)
    running.update(DATA)
    assert running.matches()
    truncated = RunningHash(digest)
    truncated.update(DATA[:-1])
    assert not truncated.matches()
    with pytest.raises(GrammarError):
        RunningHash("md5:" + "0" * 32)
    with pytest.raises(GrammarError):
        RunningHash("sha256:xyz")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-9/10", ByteRange(0, 9, 10)),
        ("bytes 5-5/6", ByteRange(5, 5, 6)),
        (" bytes 2-3/100 ", ByteRange(2, 3, 100)),
        ("bytes 5-4/10", None),
        ("bytes 0-10/10", None),
        ("bytes */10", None),
        ("items 0-1/2", None),
        ("bytes 0-1/2, bytes 3-4/5", None),
        (None, None),
    ],
)
def test_content_range(value: str | None, expected: ByteRange | None) -> None:
    assert parse_content_range(value) == expected


def test_a_whole_answer_needs_digest_and_length() -> None:
    headers = {H: DIGEST, "Content-Length": "10"}
    assert check_blob_answer(200, headers, DIGEST, None, digest_header=H) == ByteRange(0, 9, 10)
    assert check_blob_answer(200, headers, DIGEST, None, digest_header=H).whole
    with pytest.raises(PeerAnswerError, match="no Docker-Content-Digest"):
        check_blob_answer(200, {"Content-Length": "10"}, DIGEST, None, digest_header=H)
    with pytest.raises(PeerAnswerError, match="not sha256"):
        check_blob_answer(200, headers, OTHER, None, digest_header=H)
    with pytest.raises(PeerAnswerError, match="Content-Length"):
        check_blob_answer(200, {H: DIGEST}, DIGEST, None, digest_header=H)


def test_a_partial_answer_must_be_exactly_the_span_asked_for() -> None:
    headers = {H: DIGEST, "Content-Length": "5", "Content-Range": "bytes 5-9/10"}
    wanted = ByteRange(5, 9, 10)
    assert check_blob_answer(206, headers, DIGEST, wanted, digest_header=H) == wanted
    assert check_blob_answer(206, headers, DIGEST, None, digest_header=H) == wanted
    with pytest.raises(PeerAnswerError, match="not"):
        check_blob_answer(206, headers, DIGEST, ByteRange(4, 9, 10), digest_header=H)
    with pytest.raises(PeerAnswerError, match="unexpected status 200"):
        check_blob_answer(200, headers, DIGEST, wanted, digest_header=H)
    with pytest.raises(PeerAnswerError, match="disagree"):
        check_blob_answer(206, {**headers, "Content-Length": "4"}, DIGEST, None, digest_header=H)
    with pytest.raises(PeerAnswerError, match="Content-Range"):
        check_blob_answer(206, {H: DIGEST, "Content-Length": "5"}, DIGEST, None, digest_header=H)
