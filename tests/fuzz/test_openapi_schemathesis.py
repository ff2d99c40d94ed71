"""Runs schemathesis from docs/openapi.yaml against a running registry: no 5xx, and every status,
content type, header and body (OCI error bodies included) is one the description documents."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
import yaml
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.config import SchemathesisConfig
from schemathesis.core.transport import Response

from services.common.oci.synthetic import BuiltImage
from services.registry.headers import API_VERSION_HEADER
from tests.fuzz.runs import fuzz_settings
from tests.harness.fuzz_node import FuzzNode, fuzz_node

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
# Generated cases per operation and generation mode (positive, negative), besides the examples
# and coverage phases: about 300 requests, bounded by generation time (hypothesis drawing from
# the OCI regexes), not by the registry.
MAX_EXAMPLES = 40
MANIFEST_PATH = "/v2/{name}/manifests/{reference}"
BLOB_PATH = "/v2/{name}/blobs/{digest}"

pytestmark = pytest.mark.slow


def load_description() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    return document


DESCRIPTION = load_description()
ERROR_BODY = jsonschema_rs.validator_for(DESCRIPTION["components"]["schemas"]["ErrorBody"])
CONFIG = SchemathesisConfig.from_dict(
    {
        # Nothing written into the work tree, and the same cases on every run.
        "cache": {"enabled": False},
        "generation": {
            "mode": "all",
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
        },
        "checks": {
            # Invalid input is refused as the OCI spec says (400, 404), a too-long path or query
            # with 414.
            "negative_data_rejection": {"expected-statuses": [400, 404, 405, 414, 416, 431]},
        },
    }
)
schema = schemathesis.openapi.from_dict(DESCRIPTION, config=CONFIG)


@dataclass
class ServedContent:
    """Steers every other positive case of the manifest and blob endpoints to the image the
    registry holds (its tag, digests and byte ranges), so those meet real content rather than
    a 404; the rest go as generated."""

    image: BuiltImage
    turn: int = 0

    def steer(self, case: Case[Any]) -> int | None:
        """Point `case` at served content; the status it must then get (None: not steered)."""
        if case.meta is None or not case.meta.generation.mode.is_positive:
            return None
        if case.path not in (MANIFEST_PATH, BLOB_PATH):
            return None
        self.turn += 1
        if self.turn % 2:
            return None
        params = case.path_parameters
        params["name"] = self.image.repository
        case.query = {**case.query, "ns": self.image.registry}
        if case.path == MANIFEST_PATH:
            params["reference"] = self.image.tag if self.turn % 4 else self.image.target.digest
            return 200
        blob = self.image.blobs[self.turn % len(self.image.blobs)]
        params["digest"] = blob.digest
        ranges: list[tuple[str | None, int]] = [
            (None, 200),
            ("bytes=0-99", 206),
            (f"bytes=-{blob.size // 2}", 206),
            (f"bytes={blob.size}-", 416),
            ("bytes=9-3", 416),
            ("bytes=0-1,5-9", 200),  # several ranges: ignored, the whole blob
        ]
        value, status = ranges[(self.turn // 2) % len(ranges)]
        case.headers.pop("Range", None)
        if value is not None:
            case.headers["Range"] = value
        return status


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    with fuzz_node(tmp_path_factory.mktemp("openapi-fuzz")) as running:
        yield running


@pytest.fixture(scope="module")
def served(node: FuzzNode) -> ServedContent:
    return ServedContent(node.image)


@pytest.fixture(scope="module")
def statuses() -> Iterator[Counter[tuple[str, int]]]:
    seen: Counter[tuple[str, int]] = Counter()
    yield seen
    print(f"schemathesis: {sum(seen.values())} requests, {dict(sorted(seen.items()))}")


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as opened:
        yield opened


def oci_error_body(ctx: Any, response: Response, case: Case[Any]) -> bool | None:
    """Every error body the pull API sends (our handlers mark theirs with the API version
    header) is the OCI error body the description defines, undocumented methods' 405s too."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return None
    if API_VERSION_HEADER.lower() not in {k.lower() for k in response.headers}:
        return None
    ERROR_BODY.validate(response.json())
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
    oci_error_body,
]


@schema.parametrize()
@fuzz_settings()
def test_registry_conforms_to_openapi(
    case: Case[Any],
    node: FuzzNode,
    served: ServedContent,
    session: requests.Session,
    statuses: Counter[tuple[str, int]],
) -> None:
    expected = served.steer(case)
    response = case.call_and_validate(
        base_url=node.ports.registry_url, session=session, checks=CHECKS
    )
    statuses[(f"{case.method.upper()} {case.path}", response.status_code)] += 1
    if expected is not None:
        assert response.status_code == expected, (response.request.url, response.text[:300])
