"""Shared metrics helpers: key labels, request ids, the recent window, advertised counts."""

from __future__ import annotations

from services.common.metrics import key_labels, registry_of_image
from services.common.request_id import (
    GRPC_METADATA_KEY,
    MAX_LENGTH,
    accept_request_id,
    from_metadata,
)
from services.pinner.metrics import advertised_counts
from services.registry.stats import RecentOutcomes, Result

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def test_key_labels() -> None:
    assert key_labels(DIGEST) == ("", "digest")
    assert key_labels("docker.io/library/app:1.0") == ("docker.io", "tag")
    assert key_labels("ghcr.io:443/x/y:2") == ("ghcr.io:443", "tag")
    assert registry_of_image("quay.io/a/b:1") == "quay.io"
    assert registry_of_image("b") == ""


def test_incoming_request_ids() -> None:
    assert accept_request_id("pull-1234") == "pull-1234"
    for bad in (None, "", "two words", "line\nbreak", "x" * (MAX_LENGTH + 1), "caf\u00e9"):
        made = accept_request_id(bad)
        assert made != bad and len(made) == 32 and int(made, 16) >= 0
    assert accept_request_id(None) != accept_request_id(None)


def test_request_id_from_metadata() -> None:
    assert from_metadata([("other", "x"), (GRPC_METADATA_KEY, "abc")]) == "abc"
    assert from_metadata([(GRPC_METADATA_KEY, "a b")]) is None
    assert from_metadata([("other", "x")]) is None
    assert from_metadata(None) is None


def test_recent_outcomes_forget_old_results() -> None:
    now = [0.0]
    recent = RecentOutcomes(window=10.0, max_entries=3, clock=lambda: now[0])
    recent.add(Result.PEER_HIT)
    now[0] = 5.0
    recent.add(Result.NOT_FOUND)
    assert recent.counts() == {Result.PEER_HIT: 1, Result.NOT_FOUND: 1}
    now[0] = 12.0
    assert recent.counts() == {Result.NOT_FOUND: 1}
    for _ in range(5):
        recent.add(Result.LOCAL_HIT)
    assert recent.counts() == {Result.LOCAL_HIT: 3}  # bounded: oldest dropped first


def test_advertised_counts_per_registry() -> None:
    images = {
        "docker.io/library/a:1": frozenset({DIGEST, OTHER, "docker.io/library/a:1"}),
        "docker.io/library/a:2": frozenset({DIGEST}),
        "ghcr.io/x/y:1": frozenset({DIGEST, "ghcr.io/x/y:1"}),
        "docker.io/library/gone:1": frozenset(),
    }
    keys, counted_images = advertised_counts(images)
    # A digest shared by two registries' images counts once for each, once per registry.
    assert keys == {
        ("docker.io", "digest"): 2,
        ("docker.io", "tag"): 1,
        ("ghcr.io", "digest"): 1,
        ("ghcr.io", "tag"): 1,
    }
    assert counted_images == {"docker.io": 2, "ghcr.io": 1}
