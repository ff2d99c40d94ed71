"""What a manifest body says about its own media type (services.common.oci.media_types)."""

from __future__ import annotations

import pytest

from services.common.oci.media_types import OCI_INDEX, declared_media_type


@pytest.mark.parametrize(
    ("body", "declared"),
    [
        (b'{"mediaType": "' + OCI_INDEX.encode() + b'", "manifests": []}', OCI_INDEX),
        (b'{"mediaType": " text/plain "}', "text/plain"),  # any declared type, trimmed
        (b'{"manifests": []}', None),  # declares none (its shape is another question)
        (b'{"mediaType": 7}', None),
        (b"[1, 2]", None),
        (b"not json", None),
        (b"\xff\xfe", None),
    ],
)
def test_the_declared_media_type_is_the_top_level_field(body: bytes, declared: str | None) -> None:
    assert declared_media_type(body) == declared
