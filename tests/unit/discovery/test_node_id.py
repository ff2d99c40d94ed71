"""Node IDs and DHT keys: sizes, hashing, XOR metric, text encoding."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.discovery.kademlia import (
    ID_BITS,
    ID_BYTES,
    Contact,
    NodeIdError,
    common_prefix_length,
    dht_key,
    format_node_id,
    parse_node_id,
    random_node_id,
    xor_distance,
)

ids = st.binary(min_size=ID_BYTES, max_size=ID_BYTES)


def test_dht_key_is_sha256_of_the_key_string() -> None:
    digest = "sha256:" + "ab" * 32
    assert dht_key(digest) == hashlib.sha256(digest.encode()).digest()
    ref = "docker.io/library/alpine:3.20"
    assert dht_key(ref) == hashlib.sha256(ref.encode()).digest()
    assert len(dht_key(ref)) == ID_BYTES


def test_random_ids_are_32_bytes_and_seedable() -> None:
    assert len(random_node_id()) == ID_BYTES
    assert random_node_id() != random_node_id()
    assert random_node_id(random.Random(7)) == random_node_id(random.Random(7))


@given(ids, ids, ids)
def test_xor_metric(a: bytes, b: bytes, c: bytes) -> None:
    assert xor_distance(a, a) == 0
    assert xor_distance(a, b) == xor_distance(b, a)
    # XOR satisfies the triangle inequality.
    assert xor_distance(a, c) <= xor_distance(a, b) + xor_distance(b, c)


def test_common_prefix_length() -> None:
    zero = bytes(ID_BYTES)
    assert common_prefix_length(zero, zero) == ID_BITS
    assert common_prefix_length(zero, b"\x80" + bytes(ID_BYTES - 1)) == 0
    assert common_prefix_length(zero, b"\x01" + bytes(ID_BYTES - 1)) == 7
    assert common_prefix_length(zero, bytes(ID_BYTES - 1) + b"\x01") == ID_BITS - 1


@given(ids)
def test_text_form_round_trips(node_id: bytes) -> None:
    text = format_node_id(node_id)
    assert len(text) == 64
    assert parse_node_id(text + "\n") == node_id


@pytest.mark.parametrize("text", ["", "ab", "zz" * 32, "00" * 33])
def test_bad_text_is_rejected(text: str) -> None:
    with pytest.raises(NodeIdError):
        parse_node_id(text)


def test_contact_rejects_short_ids_and_formats_endpoints() -> None:
    with pytest.raises(NodeIdError):
        Contact(b"\x01" * 31, "10.0.0.1", 5001, 6443)
    v4 = Contact(bytes(ID_BYTES), "10.0.0.1", 5001, 6443)
    v6 = Contact(bytes(ID_BYTES), "fd00::1", 5001, 6443)
    assert v4.discovery_endpoint == "10.0.0.1:5001"
    assert v6.registry_endpoint == "[fd00::1]:6443"
