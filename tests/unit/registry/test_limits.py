"""The registry's limits: 414 for long paths and queries, per-client relay slots (429)."""

from __future__ import annotations

import json

import pytest

from services.registry.limits import ClientSlots, RequestLimits, TooManyRelays, headers_too_large


def test_path_and_query_within_bounds_pass() -> None:
    limits = RequestLimits(max_path_bytes=20, max_query_bytes=10)
    assert limits.check("/v2/a/manifests/1", "ns=x") is None


@pytest.mark.parametrize(
    ("path", "query", "limit"),
    [("/v2/" + "a" * 30, "", "max_path_bytes"), ("/v2/", "ns=" + "d" * 20, "max_query_bytes")],
)
def test_too_long_is_414_with_oci_body(path: str, query: str, limit: str) -> None:
    error = RequestLimits(max_path_bytes=20, max_query_bytes=10).check(path, query)
    assert error is not None and error.status == 414
    body = json.loads(error.body())
    assert body["errors"][0]["code"] == "UNSUPPORTED"
    assert body["errors"][0]["detail"]["limit"] == limit


def test_multibyte_characters_count_as_bytes() -> None:
    limits = RequestLimits(max_path_bytes=4, max_query_bytes=4)
    assert limits.check("éé", "") is None
    assert limits.check("ééé", "") is not None


def test_headers_too_large_is_431() -> None:
    error = headers_too_large(8192)
    assert error.status == 431
    assert json.loads(error.body())["errors"][0]["detail"]["max"] == 8192


def test_client_slots_refuse_past_limit_and_free_on_exit() -> None:
    slots = ClientSlots(limit=2, local_limit=8)
    with slots.hold("10.0.0.1"), slots.hold("10.0.0.1"):
        with pytest.raises(TooManyRelays) as refused, slots.hold("10.0.0.1"):
            pass
        assert refused.value.status == 429
        assert json.loads(refused.value.body())["errors"][0]["code"] == "TOOMANYREQUESTS"
        # Another client has its own share.
        with slots.hold("10.0.0.2"):
            assert slots.active == {"10.0.0.1": 2, "10.0.0.2": 1}
    assert slots.active == {}


def test_the_local_containerd_shares_one_node_wide_budget() -> None:
    slots = ClientSlots(limit=1, local_limit=3)
    with slots.hold("127.0.0.1"), slots.hold("::1"), slots.hold("127.0.0.1"):
        with pytest.raises(TooManyRelays) as refused, slots.hold("::1"):
            pass
        detail = json.loads(refused.value.body())["errors"][0]["detail"]
        assert detail == {"limit": "max_local_relays", "max": 3}
        # A remote address keeps its own cap meanwhile.
        with slots.hold("10.0.0.1"), pytest.raises(TooManyRelays), slots.hold("10.0.0.1"):
            pass
    assert slots.active == {}
