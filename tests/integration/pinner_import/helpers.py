"""Archive builders and containerd checks shared by the air-gap import tests."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import lz4.frame  # type: ignore[import-untyped]
import zstandard

from services.common.containerd.client import ContainerdClient
from services.common.oci.media_types import OCI_INDEX
from services.common.store.protocol import Descriptor
from services.pinner.airgap import AirgapManager
from services.pinner.airgap.formats import FileKind, classify
from tests.harness.images import BuiltImage, DockerArchive, build_image

PIN = "io.cri-containerd.pinned"
MANAGED = "io.cattle.k3s.pinned"
SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.lz4", ".tar.bz2", ".tbz")
PLATFORMS = ["linux/amd64", "linux/arm64/v8", "linux/s390x"]


def compress(tar: Path, out: Path) -> Path:
    """Write `tar` to `out` compressed as its suffix says (streaming, as real tools do)."""
    kind = classify(out)
    with tar.open("rb") as src:
        if kind is FileKind.TAR:
            shutil.copyfile(tar, out)
        elif kind is FileKind.GZIP:
            with gzip.open(out, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst)
        elif kind is FileKind.BZIP2:
            with bz2.open(out, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst)
        elif kind is FileKind.LZ4:
            with lz4.frame.open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif kind is FileKind.ZSTD:
            with out.open("wb") as raw:
                zstandard.ZstdCompressor(level=1).copy_stream(src, raw)
        else:
            raise ValueError(f"not an archive name: {out}")
    return out


def multiarch_image(work: Path, name: str, seed: int = 0) -> BuiltImage:
    return build_image(
        work / "layout", name=name, layers=2, layer_size=48 * 1024, platforms=PLATFORMS, seed=seed
    )


def oci_archive(work: Path, images_dir: Path, name: str, suffix: str, seed: int = 0) -> BuiltImage:
    image = multiarch_image(work, name, seed)
    tar = image.write_oci_archive(work / f"{seed}-oci.tar")
    compress(tar, images_dir / f"{name.rsplit('/', 1)[-1].replace(':', '-')}{suffix}")
    return image


def docker_archive(
    work: Path, images_dir: Path, name: str, suffix: str, seed: int = 0
) -> DockerArchive:
    image = multiarch_image(work, name, seed)
    archive = image.write_docker_archive(work / f"{seed}-docker.tar", platform="linux/arm64/v8")
    compress(archive.path, images_dir / f"{name.rsplit('/', 1)[-1].replace(':', '-')}{suffix}")
    return archive


@asynccontextmanager
async def manager(
    address: str, namespace: str, images_dir: Path, *, poll_interval: float = 1.0
) -> AsyncIterator[AirgapManager]:
    client = ContainerdClient(address, namespace)
    airgap = AirgapManager(client, images_dir, poll_interval=poll_interval)
    try:
        yield airgap
    finally:
        await airgap.close()
        await client.close()


def nested_index_archive(
    work: Path, path: Path, name: str, *, levels: int, fanout: int, absent: int = 0
) -> Path:
    """An OCI archive whose image is `levels` nested indexes, each listing the one below it
    `fanout` times (the bottom one lists a real manifest `fanout` times, and `absent` distinct
    manifests the archive does not hold): a few KiB of JSON whose naive walk visits
    fanout**levels descriptors."""
    image = build_image(work / "nested-layout", name=name, layers=1, layer_size=1024)
    blobs: dict[str, bytes] = {d.digest: image.read_blob(d.digest) for d in image.blobs}
    child = image.target
    missing = [
        {
            "mediaType": child.media_type,
            "digest": "sha256:" + hashlib.sha256(f"absent {i}".encode()).hexdigest(),
            "size": 1000,
        }
        for i in range(absent)
    ]
    for level in range(levels):
        entry = {"mediaType": child.media_type, "digest": child.digest, "size": child.size}
        entries = [entry] * fanout + (missing if level == 0 else [])
        data = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        ).encode()
        child = Descriptor("sha256:" + hashlib.sha256(data).hexdigest(), len(data), OCI_INDEX)
        blobs[child.digest] = data
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": child.media_type,
                "digest": child.digest,
                "size": child.size,
                "annotations": {"io.containerd.image.name": name},
            }
        ],
    }
    with tarfile.open(path, "w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tar, "index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            _add(tar, f"blobs/sha256/{digest[7:]}", data)
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
