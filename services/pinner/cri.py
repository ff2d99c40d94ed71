"""Pulls through containerd's CRI, as kubelet would, for the air-gap lists and prefetches.

Going through CRI (not a pull of our own) means containerd's registry configuration applies:
the hosts.toml mirrors, so the pull is served by the cluster's peers when they hold the image.
"""

from __future__ import annotations

import grpc

from services.common.containerd.errors import translate_rpc_error
from services.common.genproto.cri.runtime.v1 import api_pb2, api_pb2_grpc

# containerd's CRI plugin always works in this namespace, whatever the caller sends.
CRI_NAMESPACE = "k8s.io"
# A pull of a large image may take minutes.
PULL_TIMEOUT = 600.0
STATUS_TIMEOUT = 10.0


class CriPuller:
    """Calls `runtime.v1.ImageService` PullImage and ImageStatus on containerd's socket."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = PULL_TIMEOUT) -> None:
        self._images = api_pb2_grpc.ImageServiceStub(channel)
        self._timeout = timeout

    async def pull(self, ref: str) -> str:
        """Pull `ref` (tag or digest); returns the image id CRI reports."""
        request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
        try:
            reply = await self._images.PullImage(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, f"CRI pull of {ref}") from err
        return str(reply.image_ref)

    async def image_size(self, ref: str) -> int:
        """Bytes of image `ref` as CRI reports them; 0 when it is not there."""
        request = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref))
        try:
            reply = await self._images.ImageStatus(request, timeout=STATUS_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, f"CRI image status of {ref}") from err
        return int(reply.image.size) if reply.HasField("image") else 0
