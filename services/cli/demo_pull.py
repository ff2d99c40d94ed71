"""The demo's pull clients: skopeo (a real registry client) when installed, else a small built-in
HTTP client; both leave an OCI layout whose every manifest and blob is checked against its digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from services.cli.demo_plan import PulledItem, repository_path
from services.common.errors import PeermirrorError
from services.common.oci.document import DocumentError, digest_of, parse_children, parse_index
from services.common.oci.media_types import (
    ACCEPT_MANIFESTS,
    OCI_INDEX,
    OCI_MANIFEST,
    detect_manifest_media_type,
    is_index_media_type,
)
from services.common.store.oci_layout import OciLayoutStore, named_images
from services.common.store.protocol import Descriptor

CHUNK = 1024 * 1024
SKOPEO_TIMEOUT_S = 600.0
HTTP_TIMEOUT_S = 60.0
# Only loopback is ever contacted: no proxy from the environment may carry the pull.
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class PullError(PeermirrorError):
    """The pull failed; the message says how (client output or the registry's error)."""


@dataclass(frozen=True)
class PullResult:
    """What one pull fetched, with which client, in how long."""

    client: str
    seconds: float
    items: list[PulledItem]


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _kind_of(desc: Descriptor, body: bytes) -> str:
    media_type = desc.media_type or detect_manifest_media_type(body) or ""
    return "index" if is_index_media_type(media_type) else "manifest"


def verify_layout(layout: Path, image: str) -> list[PulledItem]:
    """Every manifest and blob of `image` in the OCI layout `layout`, each hashed against its
    digest (and size); PullError when the image or a manifest is missing."""
    try:
        entries = parse_index((layout / "index.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise PullError(f"the pulled layout {layout} has no readable index.json: {exc}") from exc
    images = named_images(entries, bare_tag_repository=image.rpartition(":")[0])
    target = images.get(image)
    if target is None and len(images) == 1:
        # skopeo names the entry after the tag only; a layout of one image is unambiguous.
        target = next(iter(images.values()))
    if target is None:
        raise PullError(f"the pulled layout {layout} does not name {image}")
    store = OciLayoutStore(layout)
    items: list[PulledItem] = []
    pending: list[tuple[Descriptor, str | None]] = [(target, None)]
    seen: set[str] = set()
    while pending:
        desc, kind = pending.pop(0)
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        path = store.blob_file(desc.digest)
        if path is None or not path.is_file():
            raise PullError(f"the pulled layout lacks {desc.digest}")
        ok = _sha256_file(path) == desc.digest and path.stat().st_size == desc.size
        if kind is not None:
            items.append(PulledItem(kind, desc.digest, desc.size, ok))
            continue
        body = path.read_bytes()
        kind = _kind_of(desc, body)
        items.append(PulledItem(kind, desc.digest, desc.size, ok))
        pending.extend(_children(body, kind))
    return items


def _children(body: bytes, kind: str) -> list[tuple[Descriptor, str | None]]:
    """(child, kind) pairs: an index's manifests (kind None: read them), a manifest's config
    and layers; PullError when the document or a descriptor in it is malformed."""
    try:
        children = parse_children(body, OCI_INDEX if kind == "index" else OCI_MANIFEST, strict=True)
    except DocumentError as exc:
        raise PullError(f"a pulled {kind}: {exc}") from exc
    if kind == "index":
        return [(desc, None) for desc in children.manifests]
    config = [] if children.config is None else [(children.config, "config")]
    return [*config, *((desc, "layer") for desc in children.layers)]


def _client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}


# --- skopeo ------------------------------------------------------------------------------------


async def skopeo_version(skopeo: str) -> str:
    """`skopeo 1.9.3` (or just `skopeo` when it does not say)."""
    proc = await asyncio.create_subprocess_exec(
        skopeo,
        "--version",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=_client_env(),
    )
    out, _ = await proc.communicate()
    words = out.decode(errors="replace").split()
    return f"skopeo {words[2]}" if len(words) >= 3 and words[1] == "version" else "skopeo"


async def pull_with_skopeo(skopeo: str, registry: str, image: str, dest: Path) -> PullResult:
    """`skopeo copy` `image` from `registry` (host:port, plain HTTP) into the OCI layout `dest`."""
    repo, tag = repository_path(image)
    label = await skopeo_version(skopeo)
    shutil.rmtree(dest, ignore_errors=True)
    argv = [
        skopeo,
        # No trust policy applies to a throw-away local copy (and /etc/containers may be absent).
        "--insecure-policy",
        "copy",
        "--quiet",
        "--all",
        "--src-tls-verify=false",
        f"docker://{registry}/{repo}:{tag}",
        f"oci:{dest}:{tag}",
    ]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=_client_env(),
    )
    try:
        async with asyncio.timeout(SKOPEO_TIMEOUT_S):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()
        raise PullError(f"skopeo exited with {proc.returncode}: {text[-800:]}")
    items = await asyncio.to_thread(verify_layout, dest, image)
    return PullResult(label, seconds, items)


# --- the built-in client -----------------------------------------------------------------------


class _Http:
    """GETs from one registry over loopback, proxies ignored."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        # Only loopback is ever contacted: an empty proxy table ignores *_proxy variables.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def open(self, path: str, accept: str = "") -> http.client.HTTPResponse:
        request = urllib.request.Request(self.base_url + path)
        if accept:
            request.add_header("Accept", accept)
        try:
            # For http:// URLs urllib hands back the http.client response itself.
            return cast(
                http.client.HTTPResponse, self._opener.open(request, timeout=HTTP_TIMEOUT_S)
            )
        except urllib.error.HTTPError as exc:
            body = exc.read()[:2000].decode(errors="replace")
            raise PullError(f"GET {path}: HTTP {exc.code}: {body}") from None
        except OSError as exc:
            raise PullError(f"GET {path}: {exc}") from None


def _fetch_manifest(
    client: _Http, repo: str, reference: str, layout: OciLayoutStore
) -> tuple[Descriptor, bytes, bool]:
    with client.open(f"/v2/{repo}/manifests/{reference}", ", ".join(ACCEPT_MANIFESTS)) as resp:
        body = resp.read()
        media_type = (resp.headers.get("Content-Type") or "").split(";", 1)[0].strip()
        claimed = resp.headers.get("Docker-Content-Digest") or ""
    digest = digest_of(body)
    # By tag the registry's digest header is the only reference; by digest, the request is.
    expected = claimed if not reference.startswith("sha256:") else reference
    layout.add_blob_bytes(body)
    return Descriptor(digest, len(body), media_type), body, digest == expected


def _fetch_blob(client: _Http, repo: str, desc: Descriptor, layout: OciLayoutStore) -> bool:
    final = layout.blob_file(desc.digest)
    if final is None:
        raise PullError(f"malformed digest {desc.digest!r} in a manifest")
    tmp = final.with_name(f".pull-{final.name}")
    hasher = hashlib.sha256()
    size = 0
    with client.open(f"/v2/{repo}/blobs/{desc.digest}") as resp, tmp.open("wb") as out:
        while chunk := resp.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            out.write(chunk)
    ok = "sha256:" + hasher.hexdigest() == desc.digest and size == desc.size
    if ok:
        os.replace(tmp, final)
    else:
        # Never keep content under a digest it does not hash to.
        tmp.unlink(missing_ok=True)
    return ok


def pull_builtin_sync(base_url: str, image: str, dest: Path) -> list[PulledItem]:
    """Fetch `image` manifest by manifest, blob by blob, into the OCI layout `dest`; each one is
    hashed while it arrives and kept only when it matches its digest."""
    repo, tag = repository_path(image)
    shutil.rmtree(dest, ignore_errors=True)
    layout = OciLayoutStore(dest, create=True)
    client = _Http(base_url)
    items: list[PulledItem] = []
    target, body, ok = _fetch_manifest(client, repo, tag, layout)
    pending: list[tuple[Descriptor, bytes, bool]] = [(target, body, ok)]
    while pending:
        desc, body, ok = pending.pop(0)
        kind = _kind_of(desc, body)
        items.append(PulledItem(kind, desc.digest, desc.size, ok))
        for child, child_kind in _children(body, kind):
            if child_kind is None:
                got, child_body, child_ok = _fetch_manifest(client, repo, child.digest, layout)
                pending.append((got, child_body, child_ok and got.digest == child.digest))
            elif all(item.digest != child.digest for item in items):
                verified = _fetch_blob(client, repo, child, layout)
                items.append(PulledItem(child_kind, child.digest, child.size, verified))
    if all(item.verified for item in items):
        layout.set_image(image, target)
    return items


async def pull_builtin(base_url: str, image: str, dest: Path) -> PullResult:
    """The built-in client, run in a worker thread; timed like skopeo (wall clock)."""
    started = time.monotonic()
    items = await asyncio.to_thread(pull_builtin_sync, base_url, image, dest)
    return PullResult("the built-in Python client", time.monotonic() - started, items)
