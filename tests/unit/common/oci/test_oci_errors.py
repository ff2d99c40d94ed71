"""OCI error catalogue, error body rendering and manifest media-type detection."""

from __future__ import annotations

import json

import pytest

from services.common.oci import media_types as mt
from services.common.oci.errors import CATALOGUE, ErrorCode, OciError, render, status_of

SPEC_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
}


def test_catalogue_has_every_spec_code() -> None:
    assert {str(c) for c in ErrorCode if c.in_spec} == SPEC_CODES
    assert set(CATALOGUE) == set(ErrorCode)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("BLOB_UNKNOWN", 404),
        ("BLOB_UPLOAD_INVALID", 400),
        ("BLOB_UPLOAD_UNKNOWN", 404),
        ("DIGEST_INVALID", 400),
        ("MANIFEST_BLOB_UNKNOWN", 404),
        ("MANIFEST_INVALID", 400),
        ("MANIFEST_UNKNOWN", 404),
        ("NAME_INVALID", 400),
        ("NAME_UNKNOWN", 404),
        ("SIZE_INVALID", 400),
        ("UNAUTHORIZED", 401),
        ("DENIED", 403),
        ("UNSUPPORTED", 405),
        ("TOOMANYREQUESTS", 429),
        ("RANGE_INVALID", 416),
    ],
)
def test_statuses_match_distribution(code: str, status: int) -> None:
    assert ErrorCode(code).status == status
    assert OciError(code).status == status


def test_render_single_error_shape() -> None:
    body = render(OciError(ErrorCode.BLOB_UNKNOWN, detail={"digest": "sha256:00"}))
    assert json.loads(body) == {
        "errors": [
            {
                "code": "BLOB_UNKNOWN",
                "message": "blob unknown to registry",
                "detail": {"digest": "sha256:00"},
            }
        ]
    }


def test_render_omits_absent_detail_and_keeps_order() -> None:
    errors = [OciError("NAME_UNKNOWN", "no such repo"), OciError("DENIED")]
    doc = json.loads(render(errors))
    assert doc == {
        "errors": [
            {"code": "NAME_UNKNOWN", "message": "no such repo"},
            {"code": "DENIED", "message": CATALOGUE[ErrorCode.DENIED].message},
        ]
    }
    assert status_of(errors) == 404


def test_status_override_and_body() -> None:
    err = OciError(ErrorCode.MANIFEST_UNKNOWN, "refused", detail={"attempts": 3}, status=404)
    assert err.status == 404
    assert err.body() == render([err])
    assert json.loads(err.body())["errors"][0]["detail"] == {"attempts": 3}
    refused = OciError(ErrorCode.DENIED, status=404)
    assert refused.status == 404
    assert status_of(refused) == 404


def test_unserialisable_detail_still_renders() -> None:
    body = render(OciError("BLOB_UNKNOWN", detail={"path": object()}))
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_unknown_code_is_rejected() -> None:
    with pytest.raises(ValueError):
        OciError("NOT_A_CODE")


def test_render_needs_an_error() -> None:
    with pytest.raises(ValueError):
        render([])
    with pytest.raises(ValueError):
        status_of([])


def test_oci_error_is_an_exception_with_readable_text() -> None:
    err = OciError("SIZE_INVALID", "length mismatch")
    assert str(err) == "SIZE_INVALID: length mismatch"
    assert "SIZE_INVALID" in repr(err)


# --- media types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"schemaVersion":2,"mediaType":"%s","manifests":[]}' % mt.OCI_INDEX.encode(),
            mt.OCI_INDEX,
        ),
        (
            b'{"schemaVersion":2,"mediaType":"%s","manifests":[]}'
            % mt.DOCKER_MANIFEST_LIST.encode(),
            mt.DOCKER_MANIFEST_LIST,
        ),
        (
            b'{"schemaVersion":2,"mediaType":"%s","config":{},"layers":[]}'
            % mt.DOCKER_MANIFEST.encode(),
            mt.DOCKER_MANIFEST,
        ),
        # OCI documents may omit mediaType: the shape decides.
        (b'{"schemaVersion":2,"manifests":[{"digest":"sha256:00"}]}', mt.OCI_INDEX),
        (b'{"schemaVersion":2,"config":{"digest":"x"},"layers":[]}', mt.OCI_MANIFEST),
        # Not manifests.
        (b'{"architecture":"amd64","os":"linux","rootfs":{}}', None),
        (b'{"schemaVersion":1,"fsLayers":[]}', None),
        (b'{"schemaVersion":2,"mediaType":"%s"}' % mt.OCI_CONFIG.encode(), None),
        (b'{"mediaType":5,"manifests":[]}', None),
        (b'{"config":{}}', None),
        (b'{"config":[],"layers":[]}', None),
        (b"[1,2]", None),
        (b"\x1f\x8b\x08\x00", None),
        (b"{not json", None),
        (b"", None),
    ],
)
def test_detect_manifest_media_type(body: bytes, expected: str | None) -> None:
    assert mt.detect_manifest_media_type(body) == expected


def test_media_type_predicates() -> None:
    for t in (mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST):
        assert mt.is_index_media_type(t)
        assert mt.is_manifest_media_type(t)
        assert not mt.is_image_manifest_media_type(t)
    for t in (mt.OCI_MANIFEST, mt.DOCKER_MANIFEST):
        assert not mt.is_index_media_type(t)
        assert mt.is_manifest_media_type(t)
        assert mt.is_image_manifest_media_type(t)
    for t in (mt.OCI_CONFIG, mt.OCI_LAYER_TAR_GZIP, mt.DOCKER_LAYER_TAR_GZIP, mt.OCTET_STREAM, ""):
        assert not mt.is_manifest_media_type(t)
        assert not mt.is_index_media_type(t)
    # Parameters and case do not change the type.
    assert mt.is_index_media_type(mt.OCI_INDEX.upper() + "; charset=utf-8")
    assert set(mt.ACCEPT_MANIFESTS) == mt.MANIFEST_MEDIA_TYPES
