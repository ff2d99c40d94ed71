"""Advertise and Withdraw through the node's LocalDiscovery API, for the coordinator's Advertiser.

A digest being fetched for the cluster is advertised as soon as the fetch starts, so nodes sent
to this one as the lease holder find it as a provider; it is withdrawn when the fetch fails.
Built on the relay's discovery client, so both use one channel setup.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.genproto.peermirror.discovery.v1 import local_pb2
from services.registry.mirror.providers import DiscoveryClient

CALL_TIMEOUT_S = 2.0


class LocalAdvertiser(DiscoveryClient):
    """The LocalDiscovery API at `address` as the coordinator's Advertiser."""

    async def advertise(self, keys: Sequence[str]) -> None:
        await self._open().Advertise(
            local_pb2.AdvertiseRequest(keys=list(keys)), timeout=CALL_TIMEOUT_S
        )

    async def withdraw(self, keys: Sequence[str]) -> None:
        await self._open().Withdraw(
            local_pb2.WithdrawRequest(keys=list(keys)), timeout=CALL_TIMEOUT_S
        )
