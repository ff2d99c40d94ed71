"""Synthetic OCI images (the demo's seed image, tests and benchmarks), written as OCI layouts,
OCI archives and docker-save tars.

Images are built once into an OCI image layout directory (the blobs are generated straight to
disk, streaming, so 1 GiB layers never sit in memory) and can then be copied out in the three
forms our importers and stores consume. Everything is stdlib only and deterministic for a given
(seed, name, shape).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from services.common.oci.document import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    annotations_of,
    digest_of,
    entry_name,
    parse_index,
)
from services.common.oci.media_types import (
    DOCKER_CONFIG,
    DOCKER_LAYER_TAR,
    DOCKER_LAYER_TAR_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_TAR_GZIP,
    OCI_MANIFEST,
)
from services.common.store.protocol import Descriptor

# Short names the builder's callers use for the gzip'd layer types.
OCI_LAYER_GZIP = OCI_LAYER_TAR_GZIP
DOCKER_LAYER_GZIP = DOCKER_LAYER_TAR_GZIP

MediaFlavour = Literal["oci", "docker"]

_MEDIA: dict[str, dict[str, str]] = {
    "oci": {
        "index": OCI_INDEX,
        "manifest": OCI_MANIFEST,
        "config": OCI_CONFIG,
        "layer": OCI_LAYER_GZIP,
    },
    "docker": {
        "index": DOCKER_MANIFEST_LIST,
        "manifest": DOCKER_MANIFEST,
        "config": DOCKER_CONFIG,
        "layer": DOCKER_LAYER_GZIP,
    },
}

_CHUNK = 1024 * 1024
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK
_EPOCH = "1970-01-01T00:00:00Z"


@dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform (`os/architecture[/variant]`)."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse `linux/amd64` or `linux/arm64/v8`."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform must be os/arch[/variant], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def as_json(self) -> dict[str, str]:
        """The `platform` object of an index entry (also the os/arch fields of a config)."""
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True, slots=True)
class Layer:
    """One generated layer: the compressed blob plus what its uncompressed tar looks like."""

    descriptor: Descriptor
    diff_id: str
    uncompressed_size: int


@dataclass(frozen=True, slots=True)
class PlatformImage:
    """The manifest, config and layers built for one platform."""

    platform: Platform
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Layer, ...]


@dataclass(frozen=True, slots=True)
class DockerArchive:
    """What a docker-save tar holds; containerd synthesises its own manifest when importing it."""

    path: Path
    repo_tag: str
    config: Descriptor
    # Uncompressed layer tars: docker-save stores them as-is, so their digests are the diff_ids.
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """A synthetic image and where its blobs are.

    `target` is what the tag points at (an index for multi-platform images, else a manifest);
    `blobs` lists every blob reachable from it (index, manifests, configs, layers) once each.
    """

    name: str
    media: MediaFlavour
    target: Descriptor
    platforms: tuple[PlatformImage, ...]
    blobs: tuple[Descriptor, ...]
    layout_dir: Path
    blob_paths: dict[str, Path] = field(repr=False)

    @property
    def tag(self) -> str:
        """The tag part of `name`."""
        return split_reference(self.name)[2]

    @property
    def repository(self) -> str:
        """The repository part of `name` (without the registry host)."""
        return split_reference(self.name)[1]

    @property
    def registry(self) -> str:
        """The registry host of `name`."""
        return split_reference(self.name)[0]

    def blob_path(self, digest: str) -> Path:
        """The file holding blob `digest`."""
        return self.blob_paths[digest]

    def read_blob(self, digest: str) -> bytes:
        """The bytes of blob `digest` (meant for small blobs: manifests, configs)."""
        return self.blob_paths[digest].read_bytes()

    def index_entry(self) -> dict[str, object]:
        """The index.json entry naming this image (the full reference under both annotations:
        containerd's importer reads the first, the OCI layout convention the second)."""
        return {
            "mediaType": self.target.media_type,
            "digest": self.target.digest,
            "size": self.target.size,
            "annotations": {ANNOTATION_CONTAINERD_NAME: self.name, ANNOTATION_REF_NAME: self.name},
        }

    def write_oci_layout(self, directory: Path) -> Path:
        """Add this image to the OCI layout at `directory` (created when missing); returns it."""
        write_oci_layout(directory, [self])
        return directory

    def write_oci_archive(self, path: Path) -> Path:
        """Write an OCI archive (a tarred layout holding only this image); returns `path`."""
        write_oci_archive(path, [self])
        return path

    def write_docker_archive(self, path: Path, platform: str | None = None) -> DockerArchive:
        """Write a docker-save tar of one platform (the first when `platform` is None)."""
        return write_docker_archive(path, self, platform)


def split_reference(name: str) -> tuple[str, str, str]:
    """Split a full reference `<registry>/<repo>:<tag>` into its three parts."""
    slash = name.find("/")
    colon = name.rfind(":")
    if slash <= 0 or colon < slash or "@" in name:
        raise ValueError(f"expected a full reference <registry>/<repo>:<tag>, got {name!r}")
    return name[:slash], name[slash + 1 : colon], name[colon + 1 :]


def familiar_name(name: str) -> str:
    """The short form docker writes into RepoTags (`docker.io/library/x:t` -> `x:t`)."""
    registry, repo, tag = split_reference(name)
    if registry != "docker.io":
        return name
    if repo.startswith("library/") and repo.count("/") == 1:
        repo = repo[len("library/") :]
    return f"{repo}:{tag}"


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _DigestingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, sink: _Sink | None) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self._sink is not None:
            self._sink.write(data)
        return len(data)

    def flush(self) -> None:
        """Nothing buffered here; gzip calls this on close."""

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _random_chunks(seed_material: bytes, size: int, cheap: bool) -> Iterator[bytes]:
    """Deterministic incompressible bytes; `cheap` repeats one 1 MiB block (gzip cannot see it)."""
    rng = random.Random(hashlib.sha256(seed_material).digest())
    block = rng.randbytes(min(size, _CHUNK)) if cheap else b""
    remaining = size
    while remaining > 0:
        n = min(remaining, _CHUNK)
        yield block[:n] if cheap else rng.randbytes(n)
        remaining -= n


def _write_layer_tar(
    out: _DigestingWriter, file_name: str, chunks: Iterable[bytes], size: int
) -> None:
    """Write a one-file tar (header, data, padding, end marker) without buffering the data."""
    info = tarfile.TarInfo(file_name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    out.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    for chunk in chunks:
        out.write(chunk)
    if size % _TAR_BLOCK:
        out.write(b"\0" * (_TAR_BLOCK - size % _TAR_BLOCK))
    out.write(b"\0" * (2 * _TAR_BLOCK))
    if out.size % _TAR_RECORD:
        out.write(b"\0" * (_TAR_RECORD - out.size % _TAR_RECORD))


def _commit_blob(blobs_dir: Path, tmp: Path, digest: str) -> Path:
    final = blobs_dir / digest.split(":", 1)[1]
    os.replace(tmp, final)
    return final


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class _LayoutWriter:
    """Writes blobs into `<dir>/blobs/sha256/` and remembers what it wrote."""

    def __init__(self, directory: Path) -> None:
        self.blobs_dir = directory / "blobs" / "sha256"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.descriptors: dict[str, Descriptor] = {}
        self.paths: dict[str, Path] = {}

    def add_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = digest_of(data)
        tmp = self.blobs_dir / f".tmp-{digest[7:]}"
        tmp.write_bytes(data)
        return self._remember(Descriptor(digest, len(data), media_type), tmp)

    def add_layer(
        self,
        seed_material: bytes,
        file_name: str,
        size: int,
        media_type: str,
        cheap: bool,
        compresslevel: int,
    ) -> Layer:
        tmp = self.blobs_dir / f".tmp-layer-{hashlib.sha256(seed_material).hexdigest()}"
        with tmp.open("wb") as raw:
            compressed = _DigestingWriter(raw)
            # mtime=0 and no file name keep the gzip header, and so the digest, reproducible.
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=compressed, compresslevel=compresslevel, mtime=0
            ) as gz:
                uncompressed = _DigestingWriter(gz)
                _write_layer_tar(
                    uncompressed, file_name, _random_chunks(seed_material, size, cheap), size
                )
        desc = self._remember(Descriptor(compressed.digest, compressed.size, media_type), tmp)
        return Layer(desc, uncompressed.digest, uncompressed.size)

    def _remember(self, desc: Descriptor, tmp: Path) -> Descriptor:
        self.paths[desc.digest] = _commit_blob(self.blobs_dir, tmp, desc.digest)
        self.descriptors.setdefault(desc.digest, desc)
        return desc


def build_image(
    out_dir: Path,
    name: str = "docker.io/library/test:1.0",
    layers: int = 2,
    layer_size: int = 64 * 1024,
    platforms: Sequence[str] | None = None,
    media: MediaFlavour = "oci",
    seed: int = 0,
    cheap_data: bool = False,
    compresslevel: int = 1,
) -> BuiltImage:
    """Build a synthetic image into the OCI layout `out_dir` (created or extended) and name it.

    Each layer is a gzip'd tar holding one file of `layer_size` random bytes, so containerd can
    unpack it. `platforms=None` makes a single manifest for linux/amd64; a list (even of one)
    makes an index (OCI) or manifest list (Docker) with one manifest per platform. Content is
    derived from (seed, name, platform, layer number): same inputs, same digests.
    `cheap_data` repeats one random 1 MiB block per layer (still incompressible for gzip, whose
    window is 32 KiB). For very large layers use `cheap_data=True, compresslevel=0` (stored
    deflate blocks, still a valid gzip): ~140 MiB/s here against ~25 MiB/s at level 1.
    """
    split_reference(name)
    if layers < 0 or layer_size < 0:
        raise ValueError("layers and layer_size must be >= 0")
    kinds = _MEDIA[media]
    writer = _LayoutWriter(out_dir)
    wanted = [Platform("linux", "amd64")]
    if platforms is not None:
        wanted = [Platform.parse(p) for p in platforms]
    built: list[PlatformImage] = []
    for plat in wanted:
        made: list[Layer] = []
        for i in range(layers):
            seed_material = f"{seed}\0{name}\0{plat}\0{i}".encode()
            made.append(
                writer.add_layer(
                    seed_material,
                    f"layer{i}.bin",
                    layer_size,
                    kinds["layer"],
                    cheap_data,
                    compresslevel,
                )
            )
        config_obj = {
            **plat.as_json(),
            "created": _EPOCH,
            "config": {"Labels": {"peermirror.test/name": name}},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in made]},
            "history": [
                {"created": _EPOCH, "created_by": f"peermirror synthetic layer {i}"}
                for i in range(len(made))
            ],
        }
        config = writer.add_bytes(_json_bytes(config_obj), kinds["config"])
        manifest_obj = {
            "schemaVersion": 2,
            "mediaType": kinds["manifest"],
            "config": _desc_json(config),
            "layers": [_desc_json(layer.descriptor) for layer in made],
        }
        manifest = writer.add_bytes(_json_bytes(manifest_obj), kinds["manifest"])
        built.append(PlatformImage(plat, manifest, config, tuple(made)))
    if platforms is None:
        target = built[0].manifest
    else:
        index_obj = {
            "schemaVersion": 2,
            "mediaType": kinds["index"],
            "manifests": [
                {**_desc_json(p.manifest), "platform": p.platform.as_json()} for p in built
            ],
        }
        target = writer.add_bytes(_json_bytes(index_obj), kinds["index"])
    image = BuiltImage(
        name=name,
        media=media,
        target=target,
        platforms=tuple(built),
        blobs=tuple(writer.descriptors.values()),
        layout_dir=out_dir,
        blob_paths=dict(writer.paths),
    )
    _write_layout_index(out_dir, [image])
    return image


def _desc_json(desc: Descriptor) -> dict[str, object]:
    return {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}


def _write_layout_index(directory: Path, images: Sequence[BuiltImage]) -> None:
    """Add (or replace, by name) the entries of `images` in `<directory>/index.json`, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index_path = directory / "index.json"
    entries: list[dict[str, object]] = []
    if index_path.exists():
        entries = parse_index(index_path.read_bytes())
    names = {image.name for image in images}
    entries = [e for e in entries if entry_name(annotations_of(e)) not in names]
    entries.extend(image.index_entry() for image in images)
    tmp = directory / ".index.json.tmp"
    tmp.write_bytes(_index_bytes(entries))
    os.replace(tmp, index_path)


def _index_bytes(entries: Sequence[dict[str, object]]) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries)}, indent=2
    ).encode()


def write_oci_layout(directory: Path, images: Sequence[BuiltImage]) -> None:
    """Copy `images` into the OCI layout `directory` (created when missing) and name them there."""
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    for image in images:
        for digest, src in image.blob_paths.items():
            dst = blobs_dir / digest.split(":", 1)[1]
            if dst.exists() or src.resolve() == dst.resolve():
                continue
            tmp = blobs_dir / f".tmp-{digest[7:]}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    _write_layout_index(directory, images)


def _add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, arcname: str, path: Path) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = path.stat().st_size
    info.mode = 0o644
    with path.open("rb") as f:
        tar.addfile(info, f)


def _add_dir(tar: tarfile.TarFile, arcname: str) -> None:
    info = tarfile.TarInfo(arcname)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def write_oci_archive(path: Path, images: Sequence[BuiltImage]) -> None:
    """Write an OCI archive (`oci-layout`, `index.json`, `blobs/sha256/*`) holding `images`.

    Every index entry carries `io.containerd.image.name` (what `ctr images import` names the
    image after) and `org.opencontainers.image.ref.name`, both the full reference.
    """
    entries = {image.name: image.index_entry() for image in images}
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.TarFile(tmp, "w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tar, "index.json", _index_bytes(list(entries.values())))
        _add_dir(tar, "blobs")
        _add_dir(tar, "blobs/sha256")
        written: set[str] = set()
        for image in images:
            for digest, src in image.blob_paths.items():
                if digest not in written:
                    written.add(digest)
                    _add_file(tar, f"blobs/sha256/{digest[7:]}", src)
    os.replace(tmp, path)


def write_docker_archive(
    path: Path, image: BuiltImage, platform: str | None = None
) -> DockerArchive:
    """Write a docker-save tar (`manifest.json`, `<config hex>.json`, `<diff_id hex>/layer.tar`).

    docker-save holds one platform and uncompressed layers; they are gunzipped from the layout
    while the tar is written, never held in memory.
    """
    chosen = image.platforms[0]
    if platform is not None:
        wanted = Platform.parse(platform)
        matches = [p for p in image.platforms if p.platform == wanted]
        if not matches:
            raise ValueError(f"{image.name} has no platform {platform}")
        chosen = matches[0]
    repo_tag = familiar_name(image.name)
    config_name = f"{chosen.config.digest[7:]}.json"
    layer_names = [f"{layer.diff_id[7:]}/layer.tar" for layer in chosen.layers]
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    repo, _, tag = repo_tag.rpartition(":")
    repositories = {repo: {tag: chosen.layers[-1].diff_id[7:]}} if chosen.layers else {}
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.TarFile(tmp, "w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK) as tar:
        _add_file(tar, config_name, image.blob_paths[chosen.config.digest])
        for layer, arcname in zip(chosen.layers, layer_names, strict=True):
            _add_dir(tar, arcname.split("/")[0])
            info = tarfile.TarInfo(arcname)
            info.size = layer.uncompressed_size
            info.mode = 0o644
            with gzip.open(image.blob_paths[layer.descriptor.digest], "rb") as gz:
                tar.addfile(info, gz)
        _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
        _add_bytes(tar, "repositories", json.dumps(repositories).encode())
    os.replace(tmp, path)
    return DockerArchive(
        path=path,
        repo_tag=repo_tag,
        config=Descriptor(chosen.config.digest, chosen.config.size, DOCKER_CONFIG),
        layers=tuple(
            Descriptor(layer.diff_id, layer.uncompressed_size, DOCKER_LAYER_TAR)
            for layer in chosen.layers
        ),
    )
