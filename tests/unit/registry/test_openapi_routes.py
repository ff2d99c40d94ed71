"""Keeps docs/openapi.yaml true to the registry app: same routes and methods, same grammar,
error codes and header names, valid examples, and a valid OpenAPI 3.1 document."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
import yaml
from sanic_routing import Route as SanicRoute

from services.common.config import NodeConfig, RegistrySection, TlsSection
from services.common.oci.errors import ErrorCode
from services.common.oci.grammar import (
    NAME_PATTERN,
    REGISTRY_PATTERN,
    SUPPORTED_ALGORITHMS,
    TAG_PATTERN,
    parse_digest,
    validate_name,
    validate_registry,
    validate_tag,
)
from services.common.request_id import HTTP_HEADER as REQUEST_ID_HEADER
from services.registry.app import create_app
from services.registry.context import RegistryApp
from services.registry.headers import (
    API_VERSION,
    API_VERSION_HEADER,
    DIGEST_HEADER,
    NAMESPACE_HEADER,
    PEER_HEADER,
)
from services.registry.paths import Kind, parse_v2_path

OPENAPI = Path(__file__).resolve().parents[3] / "docs" / "openapi.yaml"
HTTP_METHODS = {"get", "head", "post", "put", "patch", "delete", "options", "trace"}
# What each described /v2 path must parse as (the catch-all route serves all three).
V2_KINDS = {
    "/v2/": Kind.BASE,
    "/v2/{name}/manifests/{reference}": Kind.MANIFEST,
    "/v2/{name}/blobs/{digest}": Kind.BLOB,
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryApp]:
    registries = tmp_path_factory.mktemp("openapi") / "registries.yaml"
    registries.write_text("mirrors: {}\n", encoding="utf-8")
    cfg = NodeConfig(
        registry=RegistrySection(peer_fetch=False, registries_file=registries),
        tls=TlsSection(enabled=False),
    )
    built = create_app(cfg, name=f"pm_openapi_{uuid.uuid4().hex[:12]}")
    built.router.finalize()
    yield built


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """`node`, or what its local `$ref` points at."""
    ref = node.get("$ref")
    if ref is None:
        return node
    target: Any = document
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return resolve(document, target)


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method.upper(), operation


def parameters(document: dict[str, Any], path: str) -> list[dict[str, Any]]:
    item = document["paths"][path]
    found = [resolve(document, p) for p in item.get("parameters", [])]
    for method, operation in item.items():
        if method in HTTP_METHODS:
            found += [resolve(document, p) for p in operation.get("parameters", [])]
    return found


def concrete(document: dict[str, Any], path: str) -> str:
    """`path` with each path parameter replaced by its first example, as containerd sends it
    (the examples follow the OCI grammar, which needs no escaping)."""
    for param in parameters(document, path):
        if param["in"] == "path":
            value = next(iter(param["examples"].values()))["value"]
            path = path.replace("{" + param["name"] + "}", value)
    return path


def served(route: SanicRoute) -> set[str]:
    return set(route.methods)


def validator(document: dict[str, Any], pointer: str) -> jsonschema_rs.Validator:
    """A validator for the schema at `pointer` in `document` (its `$ref`s resolved there)."""
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": pointer,
        "components": document["components"],
        "paths": document["paths"],
    }
    return jsonschema_rs.validator_for(root)


def test_document_is_valid_openapi(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(document).validate()


def test_every_described_path_is_served_with_exactly_its_methods(
    document: dict[str, Any], app: RegistryApp
) -> None:
    described: dict[str, set[str]] = {}
    for path, method, _ in operations(document):
        described.setdefault(path, set()).add(method)
    for path, methods in described.items():
        route, _, params = app.router.get(concrete(document, path), "GET", None)
        assert served(route) == methods, (path, route.path, served(route))
        if "path" in params:
            # The /v2 catch-all: the app's own parser must read the path as described.
            assert parse_v2_path(params["path"]).kind is V2_KINDS[path], path


def test_every_route_is_described(document: dict[str, Any], app: RegistryApp) -> None:
    reached: dict[str, set[str]] = {}
    for path, method, _ in operations(document):
        url = concrete(document, path)
        # Routes match with and without a trailing slash (strict_slashes off): /v2/ is /v2 too.
        for variant in {url, url.rstrip("/") or "/"}:
            route, _, _ = app.router.get(variant, method, None)
            reached.setdefault(route.name, set()).add(method)
    for route in app.router.routes:
        assert reached.get(route.name) == served(route), (route.path, reached.get(route.name))


def test_grammar_matches_the_registry(document: dict[str, Any]) -> None:
    params = document["components"]["parameters"]
    schemas = document["components"]["schemas"]
    assert params["name"]["schema"]["pattern"] == f"^{NAME_PATTERN}$"
    assert schemas["Tag"]["pattern"] == f"^{TAG_PATTERN}$"
    assert params["ns"]["schema"]["pattern"] == f"^{REGISTRY_PATTERN}$"
    digests = "|".join(f"{alg}:{rule.pattern}" for alg, rule in SUPPORTED_ALGORITHMS.items())
    assert schemas["Digest"]["pattern"] == f"^(?:{digests})$"
    codes = schemas["ErrorBody"]["properties"]["errors"]["items"]["properties"]["code"]["enum"]
    assert codes == [code.value for code in ErrorCode]


def test_header_names_match_the_registry(document: dict[str, Any]) -> None:
    params = {p["name"] for p in document["components"]["parameters"].values()}
    assert {PEER_HEADER, REQUEST_ID_HEADER} <= params
    responses = document["components"]["responses"]
    assert {DIGEST_HEADER, NAMESPACE_HEADER} <= set(responses["Manifest"]["headers"])
    assert {DIGEST_HEADER, NAMESPACE_HEADER} <= set(responses["Blob"]["headers"])
    version = resolve(document, responses["ApiVersion"]["headers"][API_VERSION_HEADER])
    assert version["schema"]["const"] == API_VERSION


def test_parameter_examples_are_valid(document: dict[str, Any]) -> None:
    checked = 0
    for key, param in document["components"]["parameters"].items():
        check = validator(document, f"#/components/parameters/{key}/schema")
        for example in param.get("examples", {}).values():
            check.validate(example["value"])
            checked += 1
    assert checked >= 10


def test_path_examples_are_accepted_by_the_registry_grammar(document: dict[str, Any]) -> None:
    params = document["components"]["parameters"]
    for example in params["name"]["examples"].values():
        validate_name(example["value"])
    for example in params["digest"]["examples"].values():
        parse_digest(example["value"])
    for example in params["ns"]["examples"].values():
        validate_registry(example["value"])
    for example in params["reference"]["examples"].values():
        value = example["value"]
        if ":" in value:
            parse_digest(value)
        else:
            validate_tag(value)


def response_examples(document: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(pointer to the schema, example) of every response example in the document."""
    places = [
        (f"#/components/responses/{key}", response)
        for key, response in document["components"]["responses"].items()
    ]
    for path, method, operation in operations(document):
        escaped = path.replace("~", "~0").replace("/", "~1")
        for status, response in operation["responses"].items():
            where = f"#/paths/{escaped}/{method.lower()}/responses/{status}"
            places.append((where, response))
    for where, response in places:
        for media_type, content in response.get("content", {}).items():
            if "example" in content:
                pointer = f"{where}/content/{media_type.replace('/', '~1')}/schema"
                yield pointer, content["example"]


def test_response_examples_are_valid(document: dict[str, Any]) -> None:
    examples = list(response_examples(document))
    assert len(examples) >= 10
    for pointer, example in examples:
        validator(document, pointer).validate(example)
