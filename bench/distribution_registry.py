"""The Go registry (Debian `docker-registry`, distribution 2.8) as a benchmark baseline.

Its filesystem storage is laid out directly from an OCI layout: blob files are hard-linked (one
inode, so both registries read the very same cached pages) and the repository holds the link
files distribution itself writes on push. Logging is cut to warnings and the access log is off,
as for peermirror, so neither side pays for logging.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

BINARY = "docker-registry"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def lay_out_storage(
    root: Path,
    repository: str,
    tag: str,
    manifest_digest: str,
    blob_files: Mapping[str, Path],
    layer_digests: Iterable[str],
) -> None:
    """Fill distribution's filesystem storage at `root` with one tagged image.

    `blob_files` maps every blob digest (manifest, config, layers) to its file; `layer_digests`
    names the ones linked into the repository as layers (config and layers, as a push does).
    """
    v2 = root / "docker" / "registry" / "v2"
    for digest, source in blob_files.items():
        algorithm, _, encoded = digest.partition(":")
        _link_or_copy(source, v2 / "blobs" / algorithm / encoded[:2] / encoded / "data")
    repo = v2 / "repositories" / repository
    for digest in layer_digests:
        algorithm, _, encoded = digest.partition(":")
        _write(repo / "_layers" / algorithm / encoded / "link", digest)
    algorithm, _, encoded = manifest_digest.partition(":")
    manifests = repo / "_manifests"
    _write(manifests / "revisions" / algorithm / encoded / "link", manifest_digest)
    _write(manifests / "tags" / tag / "current" / "link", manifest_digest)
    _write(manifests / "tags" / tag / "index" / algorithm / encoded / "link", manifest_digest)


def write_config(path: Path, storage_root: Path, port: int) -> Path:
    """A registry config serving `storage_root` on 127.0.0.1:`port`, read-only in practice."""
    config = {
        "version": 0.1,
        "log": {"level": "warn", "formatter": "json", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_root)},
            # Debian's packaged default: blob descriptors cached in memory.
            "cache": {"blobdescriptor": "inmemory"},
            "delete": {"enabled": False},
        },
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    _write(path, yaml.safe_dump(config, sort_keys=False))
    return path


def registry_argv(config: Path) -> list[str]:
    """argv serving `config`; FileNotFoundError naming the Debian package when missing."""
    found = shutil.which(BINARY)
    if found is None:
        raise FileNotFoundError(
            f"{BINARY!r} not found on PATH: install the Debian package `docker-registry`"
        )
    return [found, "serve", str(config)]
