"""The advertiser against an in-memory LocalDiscovery on loopback: batches, restarts, outages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from services.pinner.advertiser import Advertiser, batches
from services.pinner.keys import KeyDelta
from tests.harness.fake_discovery import FakeDiscovery
from tests.harness.service_procs import free_port

WAIT_S = 15.0


def dg(n: int) -> str:
    return f"sha256:{n:064x}"


@contextlib.asynccontextmanager
async def running(advertiser: Advertiser) -> AsyncIterator[Advertiser]:
    task = asyncio.create_task(advertiser.run())
    try:
        yield advertiser
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settle(advertiser: Advertiser) -> None:
    async with asyncio.timeout(WAIT_S):
        await advertiser.wait_idle()


def test_batches_are_sorted_and_bounded() -> None:
    keys = {dg(n) for n in range(10)}
    out = batches(keys, 4)
    assert [len(b) for b in out] == [4, 4, 2]
    assert [k for b in out for k in b] == sorted(keys)
    assert batches([], 4) == []


async def test_changes_reach_discovery_in_batches() -> None:
    async with FakeDiscovery() as disco:
        adv = Advertiser(disco.address, batch_size=7)
        async with running(adv):
            adv.apply(KeyDelta(added={dg(n) for n in range(20)}))
            await settle(adv)
            assert disco.keys == {dg(n) for n in range(20)}
            assert all(len(keys) <= 7 for _, keys in disco.calls)
            adv.apply(KeyDelta(added={"docker.io/library/a:1"}, removed={dg(0), dg(1)}))
            await settle(adv)
            assert disco.keys == ({dg(n) for n in range(2, 20)} | {"docker.io/library/a:1"})


async def test_keys_discovery_holds_but_we_do_not_are_withdrawn_at_start() -> None:
    async with FakeDiscovery() as disco:
        disco.keys.update({dg(1), dg(2)})
        adv = Advertiser(disco.address)
        adv.replace({dg(2), dg(3)})
        async with running(adv):
            await settle(adv)
            assert disco.keys == {dg(2), dg(3)}
            # Only the difference was sent: dg(2) was listed, so never re-advertised.
            assert ("advertise", (dg(3),)) in disco.calls
            assert all(dg(2) not in keys for kind, keys in disco.calls if kind == "advertise")


async def test_a_restarted_discovery_gets_everything_again() -> None:
    async with FakeDiscovery() as disco:
        adv = Advertiser(disco.address, check_interval=0.2)
        async with running(adv):
            adv.replace({dg(n) for n in range(5)})
            await settle(adv)
            await disco.stop()
            await disco.start()  # same port, empty set: a restarted discovery
            assert disco.keys == set()
            async with asyncio.timeout(WAIT_S):
                await disco.wait_for(lambda keys: keys == {dg(n) for n in range(5)})


async def test_discovery_down_at_start_and_changes_meanwhile_are_not_lost() -> None:
    disco = FakeDiscovery(port=free_port())
    adv = Advertiser(disco.address, check_interval=0.2)
    async with running(adv):
        adv.apply(KeyDelta(added={dg(1), dg(2)}))
        # A fixed outage on purpose: calls fail meanwhile, and the advertiser shows failures
        # only in its log, so there is no condition to await.
        await asyncio.sleep(0.3)  # let a few calls fail
        adv.apply(KeyDelta(added={dg(3)}, removed={dg(1)}))
        await disco.start()
        try:
            async with asyncio.timeout(WAIT_S):
                await disco.wait_for(lambda keys: keys == {dg(2), dg(3)})
            await settle(adv)
            assert adv.desired == {dg(2), dg(3)}
        finally:
            await disco.stop()


@pytest.mark.parametrize("outage_changes", [False, True])
async def test_discovery_outage_while_running(outage_changes: bool) -> None:
    async with FakeDiscovery() as disco:
        adv = Advertiser(disco.address, check_interval=0.2)
        async with running(adv):
            adv.replace({dg(1)})
            await settle(adv)
            await disco.stop()
            if outage_changes:
                adv.apply(KeyDelta(added={dg(2)}))
                await asyncio.sleep(0.3)  # a fixed outage on purpose, as above
            await disco.start()
            want = {dg(1), dg(2)} if outage_changes else {dg(1)}
            async with asyncio.timeout(WAIT_S):
                await disco.wait_for(lambda keys: keys == want)
