"""Checks of Peer requests and proto conversions: the caller's address, field names in errors."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgumentError
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.discovery.wire import (
    check_keys,
    contact_from_proto,
    contact_to_proto,
    duration,
    normalize_ip,
    peer_ip,
    seconds,
    sender_contact,
)
from tests.unit.discovery.helpers import contact

ID = b"\x01" * 32


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        ("ipv4:127.0.0.1:50123", "127.0.0.1"),
        ("ipv4:10.1.2.3:1", "10.1.2.3"),
        ("ipv6:[::1]:50123", "::1"),
        ("ipv6:%5B::1%5D:50123", "::1"),
        ("ipv6:[fe80::1%25eth0]:7", "fe80::1"),
        ("ipv6:[::ffff:10.0.0.7]:50123", "10.0.0.7"),
        ("ipv6:[2001:DB8::5]:9", "2001:db8::5"),
        ("unix:/run/peermirror.sock", None),
        ("ipv4:not-an-ip:80", None),
        ("ipv4:127.0.0.1", None),
        ("", None),
    ],
)
def test_peer_ip_reads_grpc_peer_strings(peer: str, ip: str | None) -> None:
    assert peer_ip(peer) == ip


def test_normalize_ip() -> None:
    assert normalize_ip("[::1]") == "::1"
    assert normalize_ip(" 192.168.0.1 ") == "192.168.0.1"
    assert normalize_ip("example.com") is None


def _sender(node_id: bytes = ID, discovery: int = 5001, registry: int = 6443) -> pb.SenderInfo:
    return pb.SenderInfo(node_id=node_id, discovery_port=discovery, registry_port=registry)


def test_sender_contact_takes_the_address_from_the_connection() -> None:
    got = sender_contact(True, _sender(), "10.9.8.7")
    assert (got.node_id, got.address, got.discovery_port, got.registry_port) == (
        ID,
        "10.9.8.7",
        5001,
        6443,
    )


@pytest.mark.parametrize(
    ("has", "sender", "field"),
    [
        (False, pb.SenderInfo(), "sender"),
        (True, _sender(node_id=b"\x01" * 31), "sender.node_id"),
        (True, _sender(node_id=b""), "sender.node_id"),
        (True, _sender(discovery=0), "sender.discovery_port"),
        (True, _sender(discovery=70000), "sender.discovery_port"),
        (True, _sender(registry=0), "sender.registry_port"),
    ],
)
def test_bad_sender_names_the_field(has: bool, sender: pb.SenderInfo, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        sender_contact(has, sender, "10.0.0.1")
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


def test_check_keys_names_the_bad_key_and_caps_the_batch() -> None:
    assert check_keys([ID, ID], 2) == [ID, ID]
    with pytest.raises(InvalidArgumentError) as info:
        check_keys([ID, b"short"], 4)
    assert info.value.field == "keys[1]"
    with pytest.raises(InvalidArgumentError) as info:
        check_keys([ID] * 3, 2)
    assert info.value.field == "keys"
    with pytest.raises(InvalidArgumentError) as info:
        check_keys([], 2)
    assert info.value.field == "keys"


def test_contacts_round_trip_and_bad_entries_are_dropped() -> None:
    c = contact(7, "10.0.0.9")
    assert contact_from_proto(contact_to_proto(c)) == c
    bad = [
        pb.Contact(node_id=b"x", address="10.0.0.1", discovery_port=1, registry_port=1),
        pb.Contact(node_id=ID, address="host.example", discovery_port=1, registry_port=1),
        pb.Contact(node_id=ID, address="10.0.0.1", discovery_port=0, registry_port=1),
        pb.Contact(node_id=ID, address="10.0.0.1", discovery_port=1, registry_port=0),
    ]
    assert [contact_from_proto(m) for m in bad] == [None, None, None, None]


def test_duration_round_trip_and_clamp() -> None:
    assert seconds(duration(1.5)) == 1.5
    assert seconds(duration(-3)) == 0.0
