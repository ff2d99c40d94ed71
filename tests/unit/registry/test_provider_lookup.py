"""ProviderLookup over the in-memory Router: distinct usable peers, failures kept as an error."""

from __future__ import annotations

from services.common.discovery_router import Provider
from services.registry.mirror.hedging import Peer
from services.registry.mirror.providers import ProviderLookup
from tests.harness.fake_router import FakeRouter, LeaseTable

KEY = "sha256:" + "a" * 64


async def test_usable_distinct_providers_are_found_in_order() -> None:
    router = FakeRouter()
    router.providers[KEY] = [
        Provider("10.0.0.1", 6443, b"\x01"),
        Provider("registry.example", 6443),  # a name, never resolved: skipped
        Provider("10.0.0.1", 6443, b"\x01"),  # the same peer again
        Provider("10.0.0.2", 6443),
    ]
    lookup = ProviderLookup(router, KEY, limit=5, deadline=1.0)
    assert await lookup.wait_more(1, within=1.0)
    await lookup.close()
    assert lookup.found == [Peer("10.0.0.1", 6443, "01"), Peer("10.0.0.2", 6443)]
    assert lookup.error is None
    assert lookup.resolve_outcome()[1] is True


async def test_a_failed_lookup_is_no_provider_with_the_reason_kept() -> None:
    table = LeaseTable()
    table.down = True
    lookup = ProviderLookup(FakeRouter(table), KEY, limit=5, deadline=1.0)
    assert not await lookup.wait_more(0, within=1.0)
    await lookup.close()
    assert lookup.found == []
    assert lookup.done
    assert lookup.error == "discovery: UNAVAILABLE: down"
    assert lookup.resolve_outcome()[1] is False
