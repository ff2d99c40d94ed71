"""The upstream client: fetch manifests and blobs the way containerd would, and no other way.

For a registry it tries, in order, the endpoints containerd would (see routes.py), each with its
`configs.<host>` TLS and credentials, answering 401 challenges (Bearer token flow with a token
cache, or Basic) and following blob redirects (bounded, http(s) only, Authorization dropped when
the host changes). What it never does: contact an endpoint containerd would not (the embedded
mirror included), send a registry's credentials to another host, follow a redirect to another
scheme, or use proxies from the environment.

Every fetch holds one of this node's upstream slots until its body is closed (limits.py), and
fails with one of the typed errors of errors.py.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from services.common.config import UpstreamSection
from services.common.errors import PeermirrorError
from services.common.hostport import join_host_port
from services.common.k3s.registries import Registries, TLSConfig
from services.common.oci.grammar import is_valid_digest, is_valid_name, is_valid_tag
from services.common.oci.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from services.registry.upstream.body import UpstreamBody
from services.registry.upstream.challenge import Challenge, parse_challenges
from services.registry.upstream.credentials import (
    Credentials,
    CredentialsError,
    credentials_from,
    token_request,
)
from services.registry.upstream.errors import (
    UpstreamAuthError,
    UpstreamBusy,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from services.registry.upstream.limits import FetchLimiter
from services.registry.upstream.metrics import UpstreamMetrics
from services.registry.upstream.routes import UpstreamRoute, routes_for
from services.registry.upstream.tokens import TokenCache, TokenResponseError, parse_token_response

if TYPE_CHECKING:
    from services.common.config import NodeConfig

# containerd's Accept for manifests (remotes/docker/resolver.go): the four manifest and index
# types, then anything, so a registry never answers 406.
MANIFEST_ACCEPT = ", ".join((DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"))
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Go's http.Client (containerd's) stops after 10 redirects.
MAX_REDIRECTS = 10
# Token answers are small JSON documents; anything larger is not one.
MAX_TOKEN_BYTES = 1024 * 1024
USER_AGENT = "peermirror-upstream"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """How this node fetches from upstream registries: the `upstream` section's limits and
    timeouts, and what comes from elsewhere in the config."""

    limits: UpstreamSection = field(default_factory=UpstreamSection)
    # K3s disable-default-registry-endpoint: only the listed endpoints are upstreams.
    disable_default_endpoint: bool = False
    # This node's own registry addresses (host:port), never upstream endpoints.
    own_hosts: frozenset[str] = field(default_factory=frozenset)
    max_redirects: int = MAX_REDIRECTS

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> UpstreamSettings:
        """Settings from a loaded node config (k3s switches already folded into pinner)."""
        port = cfg.registry.port
        hosts = ["127.0.0.1", "localhost", "::1", *([cfg.node.address] if cfg.node.address else [])]
        own = {join_host_port(host, port) for host in hosts}
        return cls(
            limits=cfg.upstream,
            disable_default_endpoint=cfg.pinner.disable_default_endpoint,
            own_hosts=frozenset(own),
        )


class _AttemptFailed(PeermirrorError):
    """One endpoint gave no usable answer; `kind` is how it counts: auth, not_found, unavailable."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class UpstreamClient:
    """Fetches manifests and blobs from a registry's upstream endpoints; one per node.

    `registries` is asked for the current registries.yaml on every fetch, so a reloaded file
    applies to the next fetch. Call :meth:`close` when done.
    """

    def __init__(
        self,
        registries: Callable[[], Registries],
        settings: UpstreamSettings | None = None,
        metrics: UpstreamMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registries = registries
        self.settings = settings or UpstreamSettings()
        self._metrics = metrics
        self._clock = clock
        limits = self.settings.limits
        self.limiter = FetchLimiter(
            limits.max_concurrent_fetches, limits.max_bandwidth, limits.queue_wait, clock
        )
        self.tokens = TokenCache()
        # Hosts that asked for Basic auth: later requests send it at once, as containerd does.
        self._basic_hosts: set[str] = set()
        self._token_fetches: dict[tuple[str, str], asyncio.Future[str]] = {}
        self._ssl: dict[TLSConfig | None, ssl.SSLContext] = {}
        self._session: aiohttp.ClientSession | None = None

    # --- public API -----------------------------------------------------------------------------

    def routes(self, registry: str) -> tuple[UpstreamRoute, ...]:
        """The endpoints fetches for `registry` go to, in order."""
        s = self.settings
        return routes_for(
            self._registries(),
            registry,
            disable_default=s.disable_default_endpoint,
            own_hosts=s.own_hosts,
        )

    async def fetch_blob(
        self, registry: str, repository: str, digest: str, offset: int = 0
    ) -> UpstreamBody:
        """GET a blob from byte `offset` on (a Range request when > 0); the body starts there."""
        if not is_valid_digest(digest):
            raise ValueError(f"not a digest: {digest!r}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        headers = {"Accept": "*/*"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = _Request("blob", "GET", registry, repository, "blobs", digest, headers, offset)
        return await self._fetch(request)

    async def fetch_manifest(
        self, registry: str, repository: str, reference: str, *, head: bool = False
    ) -> UpstreamBody:
        """GET (or HEAD, to resolve a tag) a manifest or index by tag or digest.

        ValueError for a malformed registry, repository or reference (callers validate first).
        """
        if not (is_valid_digest(reference) or is_valid_tag(reference)):
            raise ValueError(f"not a tag or digest: {reference!r}")
        method = "HEAD" if head else "GET"
        headers = {"Accept": MANIFEST_ACCEPT}
        request = _Request(
            "manifest", method, registry, repository, "manifests", reference, headers
        )
        return await self._fetch(request)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- one fetch ------------------------------------------------------------------------------

    async def _fetch(self, request: _Request) -> UpstreamBody:
        if not is_valid_name(request.repository):
            raise ValueError(f"not a repository name: {request.repository!r}")
        # Before a slot is taken: a registry name that is no host raises ValueError here.
        routes = self.routes(request.registry)
        try:
            await self.limiter.acquire()
        except UpstreamBusy:
            self._count(request.kind, "busy")
            raise
        self._gauge()
        try:
            response, route = await self._try_routes(request, routes)
        except UpstreamError as exc:
            self._release()
            self._count(request.kind, _result_of(exc))
            raise
        except BaseException:
            self._release()
            raise
        self._count(request.kind, "ok")
        skip = 0
        if request.offset and response.status == 200:
            # The endpoint ignored the Range: the body skips to the offset asked for.
            skip = request.offset
        body = UpstreamBody(
            response,
            route,
            offset=request.offset,
            skip=skip,
            on_bytes=self._received,
            pace=self.limiter.pace,
            on_close=self._release,
            head=request.method == "HEAD",
        )
        if body.head:
            body.close()
        return body

    async def _try_routes(
        self, request: _Request, routes: tuple[UpstreamRoute, ...]
    ) -> tuple[aiohttp.ClientResponse, UpstreamRoute]:
        what = f"{request.registry}/{request.repository} {request.area} {request.reference}"
        if not routes:
            raise UpstreamUnavailable(
                f"no upstream endpoint for {what} (default endpoint disabled, none listed)"
            )
        attempts: list[str] = []
        kinds: set[str] = set()
        for route in routes:
            try:
                response = await self._request(route, request)
            except _AttemptFailed as failed:
                attempts.append(f"{route.host}: {failed}")
                kinds.add(failed.kind)
                continue
            status = response.status
            if status == 200 or (status == 206 and _range_matches(response, request.offset)):
                return response, route
            response.release()
            attempts.append(f"{route.host}: HTTP {status}")
            kinds.add(_status_kind(status))
        if "auth" in kinds:
            raise UpstreamAuthError(f"upstream refused {what}", tuple(attempts))
        if "not_found" in kinds:
            raise UpstreamNotFound(f"upstream has no {what}", tuple(attempts))
        raise UpstreamUnavailable(f"no upstream answered for {what}", tuple(attempts))

    async def _request(self, route: UpstreamRoute, request: _Request) -> aiohttp.ClientResponse:
        """One endpoint: send with what auth is known, answer one 401 challenge, send again."""
        url = route.url(request.repository, request.area, request.reference)
        scope = f"repository:{route.repository(request.repository)}:pull"
        headers = dict(request.headers)
        known = self._known_auth(route, scope)
        if known is not None:
            headers["Authorization"] = known
        response = await self._send(route, request.method, url, headers)
        if response.status != 401:
            return response
        challenges = [
            c
            for value in response.headers.getall("WWW-Authenticate", ())
            for c in parse_challenges(value)
        ]
        response.release()
        if known is not None and known.startswith("Bearer "):
            self.tokens.drop(route.host, scope, known.removeprefix("Bearer "))
        headers["Authorization"] = await self._authorize(route, challenges, scope)
        return await self._send(route, request.method, url, headers)

    # --- authentication -------------------------------------------------------------------------

    def _known_auth(self, route: UpstreamRoute, scope: str) -> str | None:
        token = self.tokens.get(route.host, scope, self._clock())
        if token is not None:
            return f"Bearer {token}"
        if route.host in self._basic_hosts:
            return self._credentials(route).basic_header()
        return None

    def _credentials(self, route: UpstreamRoute) -> Credentials:
        try:
            return credentials_from(route.auth)
        except CredentialsError as exc:
            raise _AttemptFailed("auth", f"configs.{route.host}.auth: {exc}") from None

    async def _authorize(
        self, route: UpstreamRoute, challenges: list[Challenge], scope: str
    ) -> str:
        """The Authorization header answering `challenges` (Bearer preferred, then Basic)."""
        creds = self._credentials(route)
        for challenge in challenges:
            if challenge.scheme == "bearer" and challenge.realm:
                return f"Bearer {await self._shared_token(route, challenge, scope, creds)}"
        for challenge in challenges:
            if challenge.scheme == "basic":
                header = creds.basic_header()
                if header is None:
                    raise _AttemptFailed("auth", "basic auth asked, no credentials configured")
                self._basic_hosts.add(route.host)
                return header
        raise _AttemptFailed("auth", "401 without a Bearer or Basic challenge")

    async def _shared_token(
        self, route: UpstreamRoute, challenge: Challenge, scope: str, creds: Credentials
    ) -> str:
        """A token for (host, scope): from the cache, else from the one request in flight for
        it, else from a new one, so a wave of fetches for one repository asks the realm once."""
        cached = self.tokens.get(route.host, scope, self._clock())
        if cached is not None:
            return cached
        key = (route.host, scope)
        pending = self._token_fetches.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_token(route, challenge, scope, creds))
            self._token_fetches[key] = pending
            pending.add_done_callback(lambda task: self._token_fetched(key, task))
        # Shielded: one asker giving up does not cancel the request the others wait for.
        return await asyncio.shield(pending)

    def _token_fetched(self, key: tuple[str, str], task: asyncio.Future[str]) -> None:
        self._token_fetches.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so a fetch nobody awaits any more logs nothing

    async def _fetch_token(
        self, route: UpstreamRoute, challenge: Challenge, scope: str, creds: Credentials
    ) -> str:
        realm = challenge.realm or ""
        if urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise _AttemptFailed("auth", f"token realm {realm!r} is not http(s)")
        scopes = [challenge.params.get("scope") or scope]
        ask = token_request(realm, challenge.params.get("service"), scopes, creds)
        try:
            response = await self._send(route, ask.method, ask.url, dict(ask.headers), ask.form)
            try:
                if response.status in (401, 403):
                    raise _AttemptFailed("auth", f"token endpoint answered {response.status}")
                if response.status != 200:
                    raise _AttemptFailed(
                        "unavailable", f"token endpoint answered {response.status}"
                    )
                raw = await response.content.read(MAX_TOKEN_BYTES + 1)
            finally:
                response.release()
            if len(raw) > MAX_TOKEN_BYTES:
                raise _AttemptFailed("unavailable", "token response too large")
            token = parse_token_response(json.loads(raw), self._clock())
        except (ValueError, TokenResponseError) as exc:
            self._count("token", "unavailable")
            raise _AttemptFailed("unavailable", f"token endpoint: {exc}") from None
        except _AttemptFailed as failed:
            self._count("token", failed.kind)
            raise
        self._count("token", "ok")
        self.tokens.put(route.host, scope, token, self._clock())
        return token.value

    # --- transport ------------------------------------------------------------------------------

    async def _send(
        self,
        route: UpstreamRoute,
        method: str,
        url: str,
        headers: dict[str, str],
        form: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """One request, redirects followed by hand: bounded, http(s) only, and the
        Authorization header dropped for good once the host changes."""
        session = self._client_session()
        origin = _hostport(url)
        for hop in range(self.settings.max_redirects + 1):
            try:
                response = await session.request(
                    method,
                    URL(url, encoded=True),
                    headers=headers,
                    data=form,
                    allow_redirects=False,
                    # Built on first use: loading the system CAs costs a plain-http endpoint
                    # tens of milliseconds of CPU for nothing.
                    ssl=self._ssl_context(route.tls) if url.startswith("https:") else False,
                )
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                raise _AttemptFailed("unavailable", f"{type(exc).__name__}: {exc}") from None
            location = response.headers.get("Location")
            if response.status not in REDIRECT_STATUSES or location is None:
                return response
            response.release()
            if hop == self.settings.max_redirects:
                break
            target = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
                raise _AttemptFailed("unavailable", f"redirect to a non-http(s) URL {target!r}")
            if _hostport(target) != origin:
                # The registry's credentials never go to its storage backend or CDN.
                headers.pop("Authorization", None)
            if response.status == 303 and method != "HEAD":
                method, form = "GET", None
            url = target
        raise _AttemptFailed("unavailable", f"more than {self.settings.max_redirects} redirects")

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            s = self.settings
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=s.limits.connect_timeout, sock_read=s.limits.read_timeout
                ),
                headers={"User-Agent": USER_AGENT},
                # Proxies from the environment would send registry traffic elsewhere.
                trust_env=False,
                auto_decompress=False,
            )
        return self._session

    def _ssl_context(self, tls: TLSConfig | None) -> ssl.SSLContext:
        """containerd's TLS for an endpoint: system CAs plus `ca_file`, client certificate,
        or no verification at all when `insecure_skip_verify`."""
        context = self._ssl.get(tls)
        if context is not None:
            return context
        context = ssl.create_default_context()
        if tls is not None:
            if tls.ca_file:
                context.load_verify_locations(cafile=tls.ca_file)
            if tls.cert_file:
                context.load_cert_chain(tls.cert_file, tls.key_file or None)
            if tls.insecure_skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        self._ssl[tls] = context
        return context

    # --- bookkeeping ----------------------------------------------------------------------------

    def _release(self) -> None:
        self.limiter.release()
        self._gauge()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.in_flight.set(self.limiter.in_flight)

    def _count(self, kind: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.request(kind, result)

    def _received(self, n: int) -> None:
        if self._metrics is not None:
            self._metrics.received(n)


@dataclass(frozen=True, slots=True)
class _Request:
    kind: str
    method: str
    registry: str
    repository: str
    area: str
    reference: str
    headers: dict[str, str]
    offset: int = 0


def _hostport(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _range_matches(response: aiohttp.ClientResponse, offset: int) -> bool:
    """A 206 must start where asked (`Content-Range: bytes <offset>-...`)."""
    value = response.headers.get("Content-Range", "")
    unit, _, rest = value.partition(" ")
    start = rest.split("-", 1)[0]
    return unit == "bytes" and start.isdigit() and int(start) == offset


def _status_kind(status: int) -> str:
    if status in (401, 403):
        return "auth"
    if status in (404, 416):
        return "not_found"
    return "unavailable"


def _result_of(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamAuthError):
        return "auth"
    if isinstance(exc, UpstreamNotFound):
        return "not_found"
    if isinstance(exc, UpstreamBusy):
        return "busy"
    return "unavailable"
