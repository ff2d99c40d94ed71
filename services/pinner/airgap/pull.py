"""Pulls the images a `.txt` list file names through containerd's CRI, as kubelet would.

Going through CRI (not a pull of our own) means containerd's registry configuration applies:
the hosts.toml mirrors, so the pull is served by the cluster's peers when they hold the image.
"""

from __future__ import annotations

import grpc

from services.common.containerd.errors import translate_rpc_error
from services.common.genproto.cri.runtime.v1 import api_pb2, api_pb2_grpc

# containerd's CRI plugin always works in this namespace, whatever the caller sends.
CRI_NAMESPACE = "k8s.io"


def parse_list(text: str) -> list[str]:
    """Image references of a list file: one per line; blank lines and `#` comments skipped."""
    refs: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and line not in refs:
            refs.append(line)
    return refs


class CriPuller:
    """Calls `runtime.v1.ImageService/PullImage` on containerd's socket."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 600.0) -> None:
        self._images = api_pb2_grpc.ImageServiceStub(channel)
        self._timeout = timeout

    async def pull(self, ref: str) -> str:
        """Pull `ref` (tag or digest); returns the image id CRI reports."""
        request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
        try:
            resp = await self._images.PullImage(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, f"CRI pull of {ref}") from err
        return resp.image_ref
