"""Fuzzes the running registry over HTTP: no 5xx, OCI error bodies, stays up, RSS bounded."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.http_cases import HttpCase, http_cases
from tests.fuzz.raw_http import RawResponse, build_request, exchange, pull_served_image
from tests.fuzz.runs import fuzz_settings
from tests.harness.fuzz_node import FuzzNode, fuzz_node

HTTP_CASES = 5000
# Requests per generated example, sent at once on separate connections.
BATCH = 5
RSS_GROWTH_LIMIT = 64 * 1024 * 1024

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    with fuzz_node(tmp_path_factory.mktemp("http-fuzz")) as running:
        yield running


def _is_ours(response: RawResponse) -> bool:
    """Whether the registry's own handlers (not Sanic's router/parser) answered: every /v2
    answer of ours carries the API version header."""
    return "docker-distribution-api-version" in response.headers


def _check_oci_body(response: RawResponse) -> None:
    assert response.headers.get("content-type", "").startswith("application/json"), response
    body = json.loads(response.body)
    assert isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]
    for error in body["errors"]:
        assert isinstance(error["code"], str) and error["code"].isupper()
        assert isinstance(error["message"], str) and error["message"]


def test_http_fuzz(node: FuzzNode) -> None:
    port = node.ports.registry_http
    digests = [d.digest for d in node.image.blobs]
    # Warm up (imports, caches) so the RSS baseline is the steady state.
    for digest in digests:
        assert exchange(
            port, build_request("GET", f"/v2/library/fuzz/blobs/{digest}?ns=docker.io", [])
        )
    baseline = node.rss("registry")
    statuses: Counter[int] = Counter()
    peak = baseline

    def check(case: HttpCase, response: RawResponse | None) -> None:
        if response is None:
            # Closing on bytes that are not HTTP is fine; on valid HTTP it is not.
            assert not case.well_formed, case
            statuses[0] += 1
            return
        statuses[response.status] += 1
        assert response.status < 500, (case, response)
        has_body = case.method != "HEAD" and response.status >= 400
        if has_body and _is_ours(response):
            _check_oci_body(response)
        # Everything under /v2 that parses as HTTP is answered by our handlers.
        if has_body and case.well_formed and case.path.startswith("/v2"):
            assert _is_ours(response), (case, response)

    case_strategy = http_cases(digests)

    @fuzz_settings(HTTP_CASES // BATCH)
    @given(cases=st.lists(case_strategy, min_size=BATCH, max_size=BATCH))
    def run(cases: list[HttpCase]) -> None:
        nonlocal peak
        requests = [build_request(c.method, c.target, c.headers) for c in cases]
        for case, response in zip(
            cases, pool.map(lambda r: exchange(port, r), requests), strict=True
        ):
            check(case, response)
        if sum(statuses.values()) % 500 == 0:
            peak = max(peak, node.rss("registry"))

    with ThreadPoolExecutor(BATCH) as pool:
        run()
    peak = max(peak, node.rss("registry"))
    assert node.alive("registry")
    print(
        f"http fuzz: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}, "
        f"registry RSS {baseline / 2**20:.1f} MiB -> peak {peak / 2**20:.1f} MiB"
    )
    assert sum(statuses.values()) >= HTTP_CASES
    assert peak - baseline < RSS_GROWTH_LIMIT
    # Still serving real pulls after the run.
    pull_served_image(node)
