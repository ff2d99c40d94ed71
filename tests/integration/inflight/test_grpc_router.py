"""The coordinator's lease client and advertiser against real discovery nodes on loopback."""

from __future__ import annotations

from pathlib import Path

from services.common.discovery_router import GrpcRouter
from tests.harness.discovery_mesh import REGISTRY_PORT_BASE, Mesh, find_providers, wait_until

DIGEST = "sha256:" + "5e" * 32


async def test_one_node_gets_the_lease_the_other_is_told_who_holds_it(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path)
    try:
        await mesh.grow(2)
        first, second = (GrpcRouter(n.local_address) for n in mesh.nodes)
        try:
            granted = await first.acquire(DIGEST)
            assert granted.granted and granted.ttl > 0
            told = await second.acquire(DIGEST)
            assert not told.granted
            assert told.holder is not None
            assert told.holder.registry_port == REGISTRY_PORT_BASE  # node 0's registry
            assert await first.renew(DIGEST)
            assert not await second.renew(DIGEST)  # not its lease
            await second.release(DIGEST)  # not its lease either: ignored
            await first.release(DIGEST)
            taken = await second.acquire(DIGEST)
            assert taken.granted
            assert not await first.renew(DIGEST)  # the lease passed on
        finally:
            await first.close()
            await second.close()
    finally:
        await mesh.close()


async def test_advertised_digest_is_found_by_another_node_until_withdrawn(
    tmp_path: Path,
) -> None:
    mesh = Mesh(tmp_path)
    try:
        await mesh.grow(2)
        holder, waiter = mesh.nodes
        ports = GrpcRouter(holder.local_address)
        try:
            await ports.advertise([DIGEST])

            async def found() -> bool:
                return len(await find_providers(waiter.local_address, DIGEST)) == 1

            await wait_until(found, within=10)
            await ports.withdraw([DIGEST])

            async def gone() -> bool:
                return not await find_providers(waiter.local_address, DIGEST)

            await wait_until(gone, within=10)
        finally:
            await ports.close()
    finally:
        await mesh.close()
