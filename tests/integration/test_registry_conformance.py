"""The OCI distribution-spec conformance pull cases, ported to pytest, against both store backends.

The Go suite (`conformance/` of opencontainers/distribution-spec) cannot be built here; these are
its read-only pull cases (legacy ones plus the newer range, 416 and header cases, as listed in
shared/REFERENCE.md section 5) and the manifest/blob separation rules, run against the registry
over real HTTP, backed by a real containerd and by an OCI image layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from services.common.oci.errors import ErrorCode
from services.common.store.containerd_store import ContainerdStore
from services.common.store.oci_layout import OciLayoutStore
from services.common.store.protocol import ContentStore
from tests.harness.containerd import ContainerdDaemon
from tests.harness.containerd_store_factory import import_image
from tests.harness.images import OCI_INDEX, OCI_MANIFEST, BuiltImage, build_image
from tests.harness.registry_inproc import RunningRegistry, serve_registry

NS = "docker.io"
SINGLE = "docker.io/conformance/app:1.0"
MULTI = "docker.io/conformance/multi:2.0"
RANGE_BLOB = hashlib.sha256(b"peermirror range blob").digest() * 64  # 2048 bytes
RANGE_DIGEST = "sha256:" + hashlib.sha256(RANGE_BLOB).hexdigest()
KNOWN_CODES = {c.value for c in ErrorCode}


@dataclass
class Images:
    single: BuiltImage
    multi: BuiltImage


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    layout = tmp_path_factory.mktemp("conformance-images")
    single = build_image(layout, name=SINGLE, layers=2, layer_size=48 * 1024)
    multi = build_image(
        layout, name=MULTI, layers=1, layer_size=16 * 1024, platforms=["linux/amd64", "linux/arm64"]
    )
    return Images(single, multi)


async def _containerd_store(
    daemon: ContainerdDaemon, namespace: str, images: Images
) -> ContentStore:
    await import_image(daemon, namespace, images.single)
    await import_image(daemon, namespace, images.multi)
    store = await ContainerdStore.open(daemon.address, namespace)
    # A loose blob of exactly 2048 bytes for the range cases; the gc.root label keeps it.
    await store.client.write_content(
        f"pm-range-{uuid.uuid4().hex}",
        RANGE_BLOB,
        expected=RANGE_DIGEST,
        size=len(RANGE_BLOB),
        labels={"containerd.io/gc.root": "2026-01-01T00:00:00Z"},
    )
    return store


def _layout_store(path: Path, images: Images) -> ContentStore:
    store = OciLayoutStore(path, create=True, poll_interval=0.1)
    images.single.write_oci_layout(path)
    images.multi.write_oci_layout(path)
    assert store.add_blob_bytes(RANGE_BLOB) == RANGE_DIGEST
    return store


@dataclass
class Client:
    registry: RunningRegistry
    session: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, ns: str | None = NS
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        params = {"ns": ns} if ns is not None else {}
        async with self.session.request(
            method, self.registry.url + path, headers=headers, params=params
        ) as resp:
            body = await resp.read()
            assert "WWW-Authenticate" not in resp.headers
            if resp.status >= 400:
                assert resp.status < 500, body
            return resp.status, resp.headers, body


@pytest.fixture(params=["containerd", "oci-layout"])
async def client(
    request: pytest.FixtureRequest, images: Images, tmp_path: Path
) -> AsyncIterator[Client]:
    if request.param == "containerd":
        daemon: ContainerdDaemon = request.getfixturevalue("containerd_daemon")
        namespace: str = request.getfixturevalue("containerd_namespace")
        store = await _containerd_store(daemon, namespace, images)
    else:
        store = _layout_store(tmp_path / "layout", images)
    try:
        async with (
            serve_registry(store, tmp_path) as registry,
            aiohttp.ClientSession() as session,
        ):
            yield Client(registry, session)
    finally:
        await store.close()


def _error_codes(body: bytes) -> list[str]:
    return [e["code"] for e in json.loads(body)["errors"]]


def _random_digest() -> str:
    return "sha256:" + hashlib.sha256(os.urandom(16)).hexdigest()


# --- base ---------------------------------------------------------------------------------------


async def test_base_endpoint_answers_200(client: Client) -> None:
    for method in ("GET", "HEAD"):
        status, _, _ = await client.call(method, "/v2/", ns=None)
        assert status == 200


# --- blobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_unknown_blob_is_404(client: Client, method: str) -> None:
    status, _, body = await client.call(method, f"/v2/conformance/app/blobs/{_random_digest()}")
    assert status == 404
    if method == "GET":
        assert _error_codes(body) == ["BLOB_UNKNOWN"]


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_existing_blob_has_matching_digest_and_length(
    client: Client, images: Images, method: str
) -> None:
    layer = images.single.platforms[0].layers[0].descriptor
    status, headers, body = await client.call(method, f"/v2/conformance/app/blobs/{layer.digest}")
    assert status == 200
    assert headers["Docker-Content-Digest"] == layer.digest
    assert headers["Content-Length"] == str(layer.size)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["OCI-Namespace"] == NS
    if method == "GET":
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
    else:
        assert body == b""


async def test_config_json_is_served_as_a_blob(client: Client, images: Images) -> None:
    config = images.single.platforms[0].config
    status, headers, body = await client.call("GET", f"/v2/conformance/app/blobs/{config.digest}")
    assert status == 200
    assert headers["Docker-Content-Digest"] == config.digest
    assert body == images.single.read_blob(config.digest)


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_manifest_requested_as_blob_is_blob_unknown(
    client: Client, images: Images, method: str
) -> None:
    for digest in (images.single.target.digest, images.multi.target.digest):
        status, _, body = await client.call(method, f"/v2/conformance/app/blobs/{digest}")
        assert status == 404
        if method == "GET":
            assert _error_codes(body) == ["BLOB_UNKNOWN"]


# --- ranges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=500-1499", 500, 1499),
        ("bytes=500-", 500, 2047),
        ("bytes=-500", 1548, 2047),
        ("bytes=2000-5000", 2000, 2047),
        ("bytes=0-0", 0, 0),
    ],
)
async def test_range_gives_206_with_content_range(
    client: Client, range_header: str, start: int, end: int
) -> None:
    path = f"/v2/conformance/app/blobs/{RANGE_DIGEST}"
    status, headers, body = await client.call("GET", path, {"Range": range_header})
    assert status == 206
    assert headers["Content-Length"] == str(end - start + 1)
    assert headers["Content-Range"] == f"bytes {start}-{end}/2048"
    assert headers["Docker-Content-Digest"] == RANGE_DIGEST
    assert body == RANGE_BLOB[start : end + 1]
    status, headers, body = await client.call("HEAD", path, {"Range": range_header})
    assert (status, body) == (206, b"")
    assert headers["Content-Range"] == f"bytes {start}-{end}/2048"


@pytest.mark.parametrize("range_header", ["bytes=500-0", "bytes=5000-10000", "bytes=2048-"])
async def test_unsatisfiable_range_is_416(client: Client, range_header: str) -> None:
    path = f"/v2/conformance/app/blobs/{RANGE_DIGEST}"
    status, headers, body = await client.call("GET", path, {"Range": range_header})
    assert status == 416
    assert headers["Content-Range"] == "bytes */2048"
    assert _error_codes(body) == ["RANGE_INVALID"]


@pytest.mark.parametrize("range_header", ["bytes=0-1,5-9", "bytes=abc", "items=0-5"])
async def test_multi_or_malformed_range_is_ignored(client: Client, range_header: str) -> None:
    path = f"/v2/conformance/app/blobs/{RANGE_DIGEST}"
    status, headers, body = await client.call("GET", path, {"Range": range_header})
    assert status == 200
    assert "Content-Range" not in headers
    assert body == RANGE_BLOB


# --- manifests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_invalid_manifest_name_is_404(client: Client, method: str) -> None:
    status, _, _ = await client.call(method, "/v2/conformance/app/manifests/.INVALID_MANIFEST_NAME")
    assert status == 404


@pytest.mark.parametrize("method", ["HEAD", "GET"])
@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("which", ["single", "multi"])
async def test_manifest_by_tag_and_digest(
    client: Client, images: Images, method: str, by: str, which: str
) -> None:
    image = images.single if which == "single" else images.multi
    reference = image.tag if by == "tag" else image.target.digest
    status, headers, body = await client.call(
        method, f"/v2/{image.repository}/manifests/{reference}"
    )
    assert status == 200
    assert headers["Docker-Content-Digest"] == image.target.digest
    assert headers["Content-Type"] == (OCI_MANIFEST if which == "single" else OCI_INDEX)
    assert headers["Content-Length"] == str(image.target.size)
    assert headers["OCI-Namespace"] == NS
    if method == "GET":
        assert body == image.read_blob(image.target.digest)
    else:
        assert body == b""


async def test_platform_manifest_of_an_index_by_digest(client: Client, images: Images) -> None:
    for platform in images.multi.platforms:
        status, headers, body = await client.call(
            "GET", f"/v2/conformance/multi/manifests/{platform.manifest.digest}"
        )
        assert status == 200
        assert headers["Content-Type"] == OCI_MANIFEST
        assert body == images.multi.read_blob(platform.manifest.digest)


async def test_totallywrong_digest_is_400_with_known_code_or_404(client: Client) -> None:
    status, _, body = await client.call("GET", "/v2/conformance/app/manifests/sha256:totallywrong")
    assert status in (400, 404)
    if status == 400:
        assert set(_error_codes(body)) <= KNOWN_CODES


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_missing_manifest_digest_and_tag_are_404(client: Client, method: str) -> None:
    for reference in (_random_digest(), f"missing-{uuid.uuid4().hex[:8]}"):
        status, _, body = await client.call(method, f"/v2/conformance/app/manifests/{reference}")
        assert status == 404
        if method == "GET":
            assert _error_codes(body) == ["MANIFEST_UNKNOWN"]


async def test_layer_and_config_requested_as_manifest_are_manifest_unknown(
    client: Client, images: Images
) -> None:
    platform = images.single.platforms[0]
    for digest in (platform.layers[0].descriptor.digest, platform.config.digest, RANGE_DIGEST):
        status, _, body = await client.call("GET", f"/v2/conformance/app/manifests/{digest}")
        assert status == 404
        assert _error_codes(body) == ["MANIFEST_UNKNOWN"]


# --- methods and paths --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_write_methods_are_405_unsupported(client: Client, method: str) -> None:
    for path in ("/v2/", "/v2/conformance/app/manifests/1.0", "/v2/conformance/app/blobs/uploads/"):
        status, _, body = await client.call(method, path)
        assert status == 405
        assert _error_codes(body) == ["UNSUPPORTED"]


async def test_invalid_repository_name_is_400_name_invalid(client: Client) -> None:
    status, _, body = await client.call("GET", "/v2/Upper/Case/manifests/1.0")
    assert status == 400
    assert _error_codes(body) == ["NAME_INVALID"]
