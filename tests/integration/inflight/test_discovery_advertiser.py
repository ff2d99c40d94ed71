"""The coordinator's Advertiser against real discovery nodes: a digest advertised for an
in-flight fetch is found by another node, and gone once withdrawn."""

from __future__ import annotations

from pathlib import Path

from services.registry.inflight.discovery_advertiser import LocalAdvertiser
from tests.harness.discovery_mesh import Mesh, find_providers, wait_until

DIGEST = "sha256:" + "5e" * 32


async def test_advertised_digest_is_found_by_another_node_until_withdrawn(
    tmp_path: Path,
) -> None:
    mesh = Mesh(tmp_path)
    try:
        await mesh.grow(2)
        holder, waiter = mesh.nodes
        advertiser = LocalAdvertiser(holder.local_address)
        try:
            await advertiser.advertise([DIGEST])

            async def found() -> bool:
                return len(await find_providers(waiter.local_address, DIGEST)) == 1

            await wait_until(found, within=10)
            await advertiser.withdraw([DIGEST])

            async def gone() -> bool:
                return not await find_providers(waiter.local_address, DIGEST)

            await wait_until(gone, within=10)
        finally:
            await advertiser.close()
    finally:
        await mesh.close()
