"""The one node configuration: a typed YAML file per node plus ``PEERMIRROR_*`` overrides.

Every service and the CLI load their settings through :func:`load_config`, so a typo or a wrong
type fails at start with a message naming the dotted key and where it came from (file or
environment variable), instead of surfacing later as an odd runtime error.

The loader is deliberately small and hand-written (no pydantic): it walks the frozen dataclasses
below and their type hints, which keeps each service's resident memory low.

Environment overrides are spelled ``PEERMIRROR_<SECTION>__<KEY>`` (a double underscore separates
nesting levels, e.g. ``PEERMIRROR_REGISTRY__PORT=7443``). Lists are comma separated, mappings are
``k=v,k2=v2``, booleans accept true/false/1/0/yes/no, and an empty value sets an optional key to
null. ``PEERMIRROR_*`` variables without a double underscore are not config overrides and are left
alone (the CLI may use them for other things).

The ``k3s`` section holds K3s's own switches under K3s's hyphenated spelling
(``embedded-registry``, ``disable-default-registry-endpoint``); switches it leaves null are read
from the K3s config file named by ``node.k3s_config`` (see :mod:`services.common.k3s.switches`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from services.common.errors import PeermirrorError
from services.common.k3s.switches import (
    DISABLE_DEFAULT_ENDPOINT,
    EMBEDDED_REGISTRY,
    K3sConfigError,
    read_switches,
)

ENV_PREFIX = "PEERMIRROR_"
ENV_NESTING = "__"


class ConfigError(PeermirrorError):
    """The configuration is unusable; the message names the key and its source."""


def parse_host_port(s: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6 literals) into host and port.

    The host may be empty (``:5001`` means every interface to the caller). Raises ``ValueError``.
    """
    host, sep, port_text = s.rpartition(":")
    if not sep:
        raise ValueError(f"expected host:port, got {s!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"unterminated IPv6 literal in {s!r}")
        host = host[1:-1]
    elif ":" in host:
        # A bare IPv6 address would make the port ambiguous.
        raise ValueError(f"IPv6 addresses must be bracketed ([addr]:port), got {s!r}")
    if not port_text.isdigit():
        raise ValueError(f"port must be a number in {s!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port out of range in {s!r}")
    return host, port


def _check_port(value: object) -> None:
    if isinstance(value, int) and not 0 <= value <= 65535:
        raise ValueError(f"port out of range 0-65535: {value}")


def _check_host_port(value: object) -> None:
    if isinstance(value, str):
        parse_host_port(value)


def _check_listen_address(value: object) -> None:
    # gRPC listeners may also be unix sockets.
    if isinstance(value, str) and not value.startswith("unix:"):
        parse_host_port(value)


def _check_optional_address(value: object) -> None:
    # Empty turns the listener off; otherwise a TCP host:port (Prometheus scrapes over TCP).
    if isinstance(value, str) and value:
        parse_host_port(value)


def _check_positive(value: object) -> None:
    if isinstance(value, int | float) and value <= 0:
        raise ValueError(f"must be > 0, got {value}")


def _check_non_negative(value: object) -> None:
    if isinstance(value, int | float) and value < 0:
        raise ValueError(f"must be >= 0, got {value}")


def _check_ip_address(value: object) -> None:
    # Empty means autodetect; otherwise what peers dial and certificates name: an IP literal
    # (brackets and an IPv6 zone index are tolerated, as discovery strips them).
    if isinstance(value, str) and value.strip():
        text = value.strip().removeprefix("[").removesuffix("]").split("%", 1)[0]
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"not an IP address: {value!r}") from None


def _check_regexes(value: object) -> None:
    if isinstance(value, list):
        for i, pattern in enumerate(value):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"item {i}: invalid regex {pattern!r}: {exc}") from None


def parse_major_minor(text: str) -> tuple[int, int]:
    """A version `"1.7"` or `"v2.1.3"` as (major, minor); ValueError otherwise."""
    parts = text.strip().lstrip("v").split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"expected a containerd version major.minor, got {text!r}")
    return int(parts[0]), int(parts[1])


def _check_major_minor(value: object) -> None:
    if isinstance(value, str):
        parse_major_minor(value)


def _check_fraction(value: object) -> None:
    if isinstance(value, int | float) and not 0 < value < 1:
        raise ValueError(f"must be > 0 and < 1, got {value}")


def _doc(
    text: str,
    check: Callable[[object], None] | None = None,
    shown: str | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """Field metadata: the one-line doc, an optional value check, an optional shown default,
    and the YAML spelling when it is not the field name (K3s's hyphenated flag names)."""
    meta: dict[str, Any] = {"doc": text}
    if check is not None:
        meta["check"] = check
    if shown is not None:
        meta["shown_default"] = shown
    if key is not None:
        meta["key"] = key
    return meta


def _key(
    default: Any,
    text: str,
    check: Callable[[object], None] | None = None,
    shown: str | None = None,
    key: str | None = None,
) -> Any:
    """A config key with a plain default: ``field(default=..., metadata=_doc(...))``."""
    return field(default=default, metadata=_doc(text, check, shown, key))


def _yaml_key(f: dataclasses.Field[Any]) -> str:
    """How a field is spelled in the YAML file (environment overrides use the field name)."""
    return str(f.metadata.get("key", f.name))


LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]
StoreBackend = Literal["containerd", "oci-layout"]


@dataclass(frozen=True)
class NodeSection:
    """Identity of this node."""

    name: str = field(
        default_factory=socket.gethostname,
        metadata=_doc("node name used in logs and status", shown="<hostname>"),
    )
    data_dir: Path = _key(
        Path("/var/lib/peermirror"), "directory for peermirror's own state (keys, caches)"
    )
    address: str = _key(
        "", "IP address peers use to reach this node; empty = autodetect", check=_check_ip_address
    )
    k3s_config: Path | None = _key(
        None, "path of a K3s config.yaml to read K3s registry switches from; null = none"
    )


@dataclass(frozen=True)
class LogSection:
    """How services log."""

    level: LogLevel = _key("info", "minimum level logged")
    format: LogFormat = _key("json", "json (one object per line) or console (human readable)")


@dataclass(frozen=True)
class RegistrySection:
    """The node-local OCI pull registry containerd uses as its mirror."""

    host: str = _key("0.0.0.0", "HTTP listen host of the registry")
    port: int = _key(6443, "HTTP listen port of the registry", check=_check_port)
    grpc_address: str = field(
        # Not 6444: on K3s nodes 127.0.0.1:6444 is the agent's supervisor load balancer (and the
        # API server's own port on servers).
        default="127.0.0.1:5004",
        metadata=_doc(
            "node-local gRPC introspection address (host:port or unix:/path)",
            check=_check_listen_address,
        ),
    )
    metrics_address: str = _key(
        "127.0.0.1:5007",
        "host:port of a plain-HTTP Prometheus /metrics listener besides the /metrics route "
        "of the registry port (node-local by default); empty = off",
        check=_check_optional_address,
    )
    default_registry: str | None = _key(
        None, "registry assumed when a request carries no ns parameter; null = refuse such requests"
    )
    allow_latest: bool = _key(False, "serve tags named 'latest' (mutable, so refused by default)")
    filters: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "regexes (re.search) on 'registry/name:tag' of tag requests; when set, only "
            "matching tags are resolved (digest requests are not filtered)",
            check=_check_regexes,
        ),
    )
    registries_file: Path = _key(
        Path("/etc/rancher/k3s/registries.yaml"),
        "K3s registries.yaml whose 'mirrors' decide which registries are mirrored",
    )
    # Discovery ends its stream as soon as a lookup finds nobody, so a true miss answers in
    # milliseconds whatever this is; the bound only matters while discovery is still asking.
    # At 0.05 s (Spegel's range) busy nodes answered 404 for content a peer held (mesh tests).
    resolve_timeout: float = _key(
        0.5,
        "seconds to wait for discovery to name a provider (a lookup that finds nobody ends sooner)",
        check=_check_positive,
    )
    header_timeout: float = _key(
        0.04,
        "seconds to wait for a peer's response headers before asking another peer",
        check=_check_positive,
    )
    peer_fetch: bool = _key(
        True, "on a local miss, fetch from peers that discovery names (false: local content only)"
    )
    max_providers: int = _key(
        3, "providers asked of discovery per lookup (K3s: 3)", check=_check_positive
    )
    max_attempts: int = _key(
        4, "peer requests per client request, hedges and resumes included", check=_check_positive
    )
    peer_timeout: float = _key(
        2.0,
        "seconds a peer may take to connect, send headers or send more body bytes before "
        "it is given up",
        check=_check_positive,
    )
    quarantine_duration: float = _key(
        300.0,
        "seconds a peer proven to have sent content not matching its digest is not asked again",
        check=_check_positive,
    )
    # A relayed body is judged once per window: a drip-feeding peer resets any stall timer with
    # every byte, so only a rate over a window of time tells it apart from a slow network.
    rate_window: float = _key(
        0.5,
        "seconds over which a relayed body's rate from one peer is measured and judged (with "
        "another provider's rate known, a peer is first judged after a fifth of it, under a "
        "quarter of slow_peer_ratio)",
        check=_check_positive,
    )
    rate_probe_bytes: int = _key(
        524288,
        "bytes a relay asks of another provider, and drops, to measure its rate when no rate "
        "is known to judge the relay's peer by (a node's first pull; only for blobs of at "
        "least four times this); 0: never",
        check=_check_non_negative,
    )
    min_peer_rate: float = _key(
        131072.0,
        "bytes per second a peer must send a relayed body at (over rate_window); a slower "
        "one is ranked down and the body resumed from the next peer by Range",
        check=_check_positive,
    )
    slow_peer_ratio: float = _key(
        0.2,
        "a peer sending a body slower than this fraction of the fastest rate seen from "
        "another provider is ranked down and the body resumed from that provider by Range",
        check=_check_fraction,
    )
    peer_attempt_timeout: float = _key(
        600.0,
        "seconds one peer request may take in all (headers and body) before the body is "
        "resumed from the next peer",
        check=_check_positive,
    )
    # Input limits: image pulls need short paths and few headers, so anything larger is abuse
    # or a bug, and is refused before it costs memory.
    max_header_bytes: int = _key(
        8192,
        "bytes of request line plus headers a client may send; more is answered 431",
        check=_check_positive,
    )
    max_path_bytes: int = _key(
        2048, "bytes of a request path; a longer one is answered 414", check=_check_positive
    )
    max_query_bytes: int = _key(
        1024,
        "bytes of a request's query string; a longer one is answered 414",
        check=_check_positive,
    )
    request_timeout: float = _key(
        10.0,
        "seconds a client has to send a whole request (line, headers, body) once it began; "
        "slower clients are cut off (408)",
        check=_check_positive,
    )
    keep_alive_timeout: float = _key(
        15.0,
        "seconds an idle keep-alive connection is kept open between requests",
        check=_check_positive,
    )
    max_relays_per_client: int = _key(
        16,
        "peer relays one remote client address may have in flight; more are answered 429",
        check=_check_positive,
    )
    # The node's own containerd always dials 127.0.0.1 (or ::1): one budget for all its pulls,
    # sized for several images pulled in parallel, each with a few layers at once.
    max_local_relays: int = _key(
        128,
        "peer relays the node's own containerd (clients at 127.0.0.1 or ::1) may have in "
        "flight in all; more are answered 429",
        check=_check_positive,
    )


@dataclass(frozen=True)
class DiscoverySection:
    """The peer-to-peer discovery service (DHT of content providers)."""

    host: str = _key("0.0.0.0", "peer-facing listen host")
    port: int = _key(5001, "peer-facing listen port", check=_check_port)
    local_address: str = _key(
        "127.0.0.1:5002",
        "node-local gRPC API address (host:port or unix:/path); never expose to peers",
        check=_check_listen_address,
    )
    bootstrap_peers: list[str] = field(
        default_factory=list, metadata=_doc("static peer addresses (host:port) to join through")
    )
    bootstrap_dns: str | None = _key(None, "DNS name whose A/AAAA records are bootstrap peers")
    bootstrap_url: str | None = _key(None, "URL returning a JSON list of peer addresses")
    record_ttl: float = _key(
        600.0, "seconds a provider record lives without republish", check=_check_positive
    )
    republish_interval: float = _key(
        120.0, "seconds between republishing this node's records", check=_check_positive
    )
    lookup_cache_ttl: float = _key(5.0, "seconds provider lookups are cached for")
    probe_interval: float = _key(
        10.0,
        "seconds a peer or provider may stay silent before it is pinged",
        check=_check_positive,
    )
    probe_timeout: float = _key(
        2.0, "deadline in seconds of a liveness ping", check=_check_positive
    )
    liveness_window: float = _key(
        30.0,
        "seconds of silence after which a peer and its provider records are dropped "
        "(must exceed probe_interval)",
        check=_check_positive,
    )
    max_failures: int = _key(
        2, "consecutive failed calls after which a peer is taken for dead", check=_check_positive
    )
    rpc_timeout: float = _key(
        1.0, "deadline in seconds of every other call to a peer", check=_check_positive
    )
    metrics_address: str = _key(
        "127.0.0.1:5005",
        "host:port of the Prometheus /metrics listener (node-local by default); empty = off",
        check=_check_optional_address,
    )
    # Input limits: a refusal names the field and is logged once per client (rate limited).
    max_keys_per_advertise: int = _key(
        10_000,
        "keys in one node-local Advertise or Withdraw call; more is refused "
        "INVALID_ARGUMENT (the pinner sends at most 256 per call)",
        check=_check_positive,
    )
    max_keys_per_peer_call: int = _key(
        1024,
        "keys in one AddProvider or RemoveProvider call from a peer; more is refused "
        "INVALID_ARGUMENT, and this node splits its own calls at it (keep it equal on "
        "every node)",
        check=_check_positive,
    )
    max_key_length: int = _key(
        1024,
        "characters of one key (digest or reference) in the node-local API; a longer one "
        "is refused INVALID_ARGUMENT",
        check=_check_positive,
    )
    # Fetch leases (shared first pulls): one node fetches a blob upstream, the others wait.
    lease_ttl: float = _key(
        10.0,
        "seconds a fetch lease lasts unless its holder renews it (AcquireLease with ttl 0); "
        "a holder that dies or stalls frees it after this long",
        check=_check_positive,
    )
    max_lease_ttl: float = _key(
        60.0,
        "most seconds a fetch lease may be asked for; the node-local API refuses more "
        "INVALID_ARGUMENT, peers' requests are cut to it (at least lease_ttl)",
        check=_check_positive,
    )
    max_leases: int = _key(
        10_000,
        "fetch leases this node keeps for the keys it is closest to; past it new leases "
        "are refused RESOURCE_EXHAUSTED (the registry then fetches on its own)",
        check=_check_positive,
    )
    max_leases_per_peer: int = _key(
        1024,
        "fetch leases one node may hold at this node at once; more is refused RESOURCE_EXHAUSTED",
        check=_check_positive,
    )
    max_records_per_peer: int = _key(
        20_000,
        "provider records this node keeps for one other node; its further new keys are "
        "not stored (refreshes are), and it is also the burst of peer_records_per_second",
        check=_check_positive,
    )
    max_records_total: int = _key(
        100_000,
        "provider records this node keeps for all other nodes (about 470 bytes each); at "
        "the cap a new record replaces one of the node holding the most (must be at least "
        "max_records_per_peer)",
        check=_check_positive,
    )
    peer_records_per_second: float = _key(
        1000.0,
        "records (keys of AddProvider calls) one other node may store or refresh here per "
        "second, sustained; a call over it is refused RESOURCE_EXHAUSTED",
        check=_check_positive,
    )


@dataclass(frozen=True)
class PinnerSection:
    """The node's containerd agent: advertises content, imports air-gap images, writes mirrors."""

    grpc_address: str = _key(
        "127.0.0.1:5003",
        "node-local gRPC API address (host:port or unix:/path)",
        check=_check_listen_address,
    )
    metrics_address: str = _key(
        "127.0.0.1:5006",
        "host:port of the Prometheus /metrics listener (node-local by default); empty = off",
        check=_check_optional_address,
    )
    images_dir: Path = _key(
        Path("/var/lib/rancher/k3s/agent/images"), "air-gap image archives to import and pin"
    )
    certs_dir: Path = _key(
        Path("/var/lib/rancher/k3s/agent/etc/containerd/certs.d"),
        "containerd certs.d directory the hosts.toml mirror files are written to",
    )
    resync_interval: float = _key(
        300.0, "seconds between full re-walks of the content store", check=_check_positive
    )
    import_settle: float = _key(
        2.0,
        "seconds a changed images-directory file must stay unchanged before it is imported",
        check=_check_positive,
    )
    import_poll_interval: float = _key(
        1.0, "seconds between scans of the images directory", check=_check_positive
    )
    max_import_descriptors: int = _key(
        100_000,
        "descriptors one archive import may handle (archive members, plus every index "
        "entry, config and layer met walking each image); an archive needing more is refused",
        check=_check_positive,
    )
    write_hosts: bool = _key(
        True,
        "write certs_dir/<host>/hosts.toml from registry.registries_file at start, and keep "
        "them so (see hosts_check_interval)",
    )
    hosts_check_interval: float = _key(
        1.0,
        "seconds between checks of registries_file and the hosts.toml files the pinner "
        "owns; a changed registries.yaml or a file K3s rewrote is put right at the next check",
        check=_check_positive,
    )
    mirror_tls: bool = _key(
        True, "the embedded registry serves https (false: hosts.toml points at http)"
    )
    ca_file: Path | None = _key(
        None,
        "cluster CA containerd trusts for the embedded registry; null = tls.ca_file when "
        "tls.enabled, else the system CAs",
    )
    client_cert_file: Path | None = _key(
        None,
        "client certificate containerd presents to the embedded registry; null = "
        "tls.cert_file when tls.enabled",
    )
    client_key_file: Path | None = _key(
        None, "private key of client_cert_file; null = tls.key_file when tls.enabled"
    )
    disable_default_endpoint: bool = _key(
        False, "K3s disable-default-registry-endpoint: mirrored registries lose upstream"
    )
    containerd_flavour: Literal["k3s", "upstream"] = _key(
        "k3s", "containerd reading hosts.toml: k3s (rewrites honoured) or upstream"
    )
    containerd_version: str = _key(
        "1.7",
        "major.minor of that containerd (dial_timeout needs >= 2.1)",
        check=_check_major_minor,
    )
    dial_timeout: float | None = _key(
        None,
        "seconds for hosts.toml dial_timeout (containerd >= 2.1); null = unset",
        check=_check_positive,
    )


@dataclass(frozen=True)
class StoreSection:
    """Where the node's content lives."""

    backend: StoreBackend = _key("containerd", "content store: containerd or oci-layout")
    containerd_address: str = _key(
        "/run/k3s/containerd/containerd.sock", "containerd gRPC socket path"
    )
    containerd_namespace: str = _key("k8s.io", "containerd namespace holding the images")
    content_root: Path | None = _key(
        None, "containerd content store directory for zero-copy reads; null = ask containerd"
    )
    oci_layout_path: Path = _key(
        Path("/var/lib/peermirror/oci-layout"),
        "OCI image layout directory used by the oci-layout backend",
    )


@dataclass(frozen=True)
class TlsSection:
    """Mutual TLS of the registry port and the discovery peer port, with the cluster CA.

    On by default: plain HTTP and plaintext gRPC between nodes must be asked for explicitly
    (``enabled: false``, for development and the local demo) and are logged as a warning at
    start. Create the files with ``peermirror certs init`` and ``peermirror certs node``.
    """

    enabled: bool = _key(
        True,
        "serve the registry and the discovery peer port over mutual TLS with the cluster "
        "CA; false = plain HTTP and plaintext gRPC (development and demo only)",
    )
    ca_file: Path | None = _key(
        None,
        "cluster CA certificate clients and peers are verified against; "
        "null = <node.data_dir>/tls/ca.crt",
    )
    cert_file: Path | None = _key(
        None,
        "this node's certificate (server and client), signed by the cluster CA; "
        "null = <node.data_dir>/tls/node.crt",
    )
    key_file: Path | None = _key(
        None, "private key of cert_file; null = <node.data_dir>/tls/node.key"
    )


@dataclass(frozen=True)
class GrpcSection:
    """Bounds shared by the gRPC servers of the three services (registry, discovery, pinner)."""

    max_message_bytes: int = _key(
        4 * 1024 * 1024,
        "bytes of one incoming gRPC message on every gRPC server of the node; a larger one "
        "is refused RESOURCE_EXHAUSTED before it is parsed",
        check=_check_positive,
    )


@dataclass(frozen=True)
class UpstreamSection:
    """Per-node limits and timeouts of fetches from upstream registries (the in-flight spool).

    Which endpoints, TLS settings and credentials are used comes from registries.yaml, as for
    containerd; these keys only bound how much this node asks of them.
    """

    max_concurrent_fetches: int = _key(
        8,
        "upstream fetches (manifests and blobs) this node runs at once; past it a fetch "
        "waits queue_wait, then the request is answered 404 (containerd pulls itself)",
        check=_check_positive,
    )
    max_bandwidth: int = _key(
        0,
        "bytes per second this node receives from upstream registries in all (token "
        "bucket, 1 s burst); 0 = no cap",
        check=_check_non_negative,
    )
    queue_wait: float = _key(
        0.5,
        "seconds a fetch waits for a free slot or for the bandwidth cap before it is "
        "given up (answered 404 fast)",
        check=_check_non_negative,
    )
    connect_timeout: float = _key(
        5.0,
        "seconds to connect to an upstream endpoint before trying the next",
        check=_check_positive,
    )
    read_timeout: float = _key(
        30.0,
        "seconds an upstream endpoint may stay silent (headers or body) before it is given up",
        check=_check_positive,
    )


@dataclass(frozen=True)
class K3sSection:
    """K3s's own registry switches, spelled as in K3s's config.yaml; null = not set here.

    :func:`load_config` fills a null switch from ``node.k3s_config`` (and its ``.d`` drop-ins)
    when that file sets it, so after loading a switch is null only when nothing set it.
    """

    embedded_registry: bool | None = _key(
        None,
        "K3s embedded-registry: false = the services run but take no part (every mirror "
        "request is answered 404, nothing is advertised); null = node.k3s_config decides, "
        "and when it does not either the node takes part",
        key=EMBEDDED_REGISTRY,
    )
    disable_default_registry_endpoint: bool | None = _key(
        None,
        "K3s disable-default-registry-endpoint; when set here or in node.k3s_config it "
        "replaces pinner.disable_default_endpoint",
        key=DISABLE_DEFAULT_ENDPOINT,
    )

    @property
    def takes_part(self) -> bool:
        """Whether this node serves mirror requests and advertises content."""
        return self.embedded_registry is not False


@dataclass(frozen=True)
class InflightSection:
    """Shared first pulls: one upstream fetch per blob or manifest for the whole cluster."""

    enabled: bool = _key(
        True,
        "on a miss no peer serves, fetch from upstream once for the cluster under a fetch "
        "lease (false: such a miss is a 404 and every containerd pulls itself)",
    )
    spool_dir: Path | None = _key(
        None,
        "directory of the spools of blobs being fetched from upstream; null = "
        "<node.data_dir>/spool",
    )
    max_spool_bytes: int = _key(
        8 * 1024 * 1024 * 1024,
        "bytes all spools may take together; a blob that does not fit is not fetched for "
        "the cluster (404, containerd pulls it itself)",
        check=_check_positive,
    )
    grace_period: float = _key(
        120.0,
        "seconds a complete spool is kept for late readers before it is deleted (the "
        "local store serves the blob by then)",
        check=_check_positive,
    )
    renew_interval: float = _key(
        2.0, "seconds between renewals of a fetch lease", check=_check_positive
    )
    stall_timeout: float = _key(
        30.0,
        "seconds a reader of a spool waits for the next bytes before its answer is aborted",
        check=_check_positive,
    )
    holder_wait: float = _key(
        30.0,
        "seconds a miss waits for the node holding the fetch lease to serve it (or for the "
        "lease to pass to this node) before it is answered 404",
        check=_check_positive,
    )
    # Long enough for a loaded node's GET by digest to follow its tag resolution (1 s was not,
    # on two shared cores), within discovery.lease_ttl so the lease needs no renewal for it.
    manifest_window: float = _key(
        5.0,
        "seconds a manifest fetched from upstream is reused for concurrent requests of the "
        "same tag or digest; tags are never cached longer",
        check=_check_positive,
    )
    upstream_resumes: int = _key(
        3,
        "times a broken upstream blob body is resumed with a Range before the fetch fails",
        check=_check_non_negative,
    )
    # Every waiter relays from its holder, so a holder's uplink carries one copy per waiter: in
    # a rollout to many nodes one holder for all would be slower than each node pulling itself.
    max_waiters_per_fetch: int = _key(
        0,
        "other nodes one node's upstream fetch of a blob serves at most; past it the next "
        "node fetches too and serves the next ones (N nodes cost about N / (this + 1) "
        "downloads; for large clusters or slow node links); 0 = no bound, one fetch for the "
        "whole cluster. Manifests are always fetched once",
        check=_check_non_negative,
    )


@dataclass(frozen=True)
class NodeConfig:
    """The whole configuration of one node."""

    node: NodeSection = field(default_factory=NodeSection)
    log: LogSection = field(default_factory=LogSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    pinner: PinnerSection = field(default_factory=PinnerSection)
    store: StoreSection = field(default_factory=StoreSection)
    k3s: K3sSection = field(default_factory=K3sSection)
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    tls: TlsSection = field(default_factory=TlsSection)
    grpc: GrpcSection = field(default_factory=GrpcSection)
    inflight: InflightSection = field(default_factory=InflightSection)


# --- type introspection --------------------------------------------------------------------

_D = TypeVar("_D")

_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    # The module uses postponed annotations, so field types must be resolved by name.
    if cls not in _hints_cache:
        _hints_cache[cls] = typing.get_type_hints(cls)
    return _hints_cache[cls]


def _optional_inner(tp: Any) -> Any | None:
    """The ``X`` of ``X | None``, or None when ``tp`` is not optional."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} | null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{_type_name(k)}, {_type_name(v)}]"
    if tp is Path:
        return "path"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _describe_value(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class _ValueError(PeermirrorError):
    """A conversion failure without location; the caller adds key and source."""


def _from_yaml(value: object, tp: Any) -> object:
    """Check and convert one YAML value to ``tp`` (nested dataclasses handled by the caller)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _from_yaml(value, inner)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            allowed = ", ".join(repr(c) for c in choices)
            raise _ValueError(f"expected one of {allowed}, got {_describe_value(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _ValueError(f"expected {_type_name(tp)}, got {_describe_value(value)}")
        (item_tp,) = typing.get_args(tp)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_from_yaml(item, item_tp))
            except _ValueError as exc:
                raise _ValueError(f"item {i}: {exc}") from None
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise _ValueError(f"expected {_type_name(tp)}, got {_describe_value(value)}")
        k_tp, v_tp = typing.get_args(tp)
        result: dict[object, object] = {}
        for k, v in value.items():
            try:
                result[_from_yaml(k, k_tp)] = _from_yaml(v, v_tp)
            except _ValueError as exc:
                raise _ValueError(f"entry {k!r}: {exc}") from None
        return result
    if tp is bool:
        if not isinstance(value, bool):
            raise _ValueError(f"expected bool, got {_describe_value(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _ValueError(f"expected int, got {_describe_value(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _ValueError(f"expected float, got {_describe_value(value)}")
        return _finite(float(value))
    if tp is str:
        if not isinstance(value, str):
            raise _ValueError(f"expected str, got {_describe_value(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise _ValueError(f"expected path, got {_describe_value(value)}")
        return Path(value)
    raise TypeError(f"config schema uses an unsupported type {tp!r}")


def _finite(value: float) -> float:
    # YAML's .nan and .inf parse as floats; every float key is a duration or a bound, where
    # NaN compares false with everything and infinity overflows timers.
    if not math.isfinite(value):
        raise _ValueError(f"expected a finite float, got {_describe_value(value)}")
    return value


_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _from_env(text: str, tp: Any) -> object:
    """Parse one environment variable's text as ``tp``."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if text == "" else _from_env(text, inner)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        return [_from_env(part.strip(), item_tp) for part in text.split(",") if part.strip()]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        result: dict[object, object] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            k, sep, v = part.partition("=")
            if not sep:
                raise _ValueError(f"expected k=v pairs separated by commas, got {part!r}")
            result[_from_env(k.strip(), k_tp)] = _from_env(v.strip(), v_tp)
        return result
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _ValueError(f"expected bool (true/false/1/0/yes/no), got {text!r}")
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise _ValueError(f"expected int, got {text!r}") from None
    if tp is float:
        try:
            number = float(text.strip())
        except ValueError:
            raise _ValueError(f"expected float, got {text!r}") from None
        return _finite(number)
    # str, Path and Literal: the text itself, checked like a YAML string.
    return _from_yaml(text, tp)


def _run_check(f: dataclasses.Field[Any], value: object) -> None:
    check = f.metadata.get("check")
    if check is not None and value is not None:
        try:
            check(value)
        except ValueError as exc:
            raise _ValueError(str(exc)) from None


def _build(cls: type[_D], data: object, prefix: str, source: str, problems: list[str]) -> _D | None:
    """Build dataclass ``cls`` from a YAML mapping; append every problem found to ``problems``.

    All problems are collected (not just the first) so one run tells the operator every bad key.
    Returns None when anything was wrong.
    """
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {_describe_value(data)}")
        return None
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    before = len(problems)
    for key in data:
        if key in fields:
            continue
        spelled = str(key).replace("_", "-")
        hint = f" (spelled '{spelled}', as K3s does)" if spelled in fields else ""
        problems.append(f"unknown key '{prefix}{key}'{hint}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            continue
        name = fields[key].name
        tp = hints[name]
        dotted = f"{prefix}{key}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            section = {} if value is None else value
            kwargs[name] = _build(tp, section, f"{dotted}.", source, problems)
            continue
        try:
            converted = _from_yaml(value, tp)
            _run_check(fields[key], converted)
        except _ValueError as exc:
            problems.append(f"{dotted}: {exc}")
            continue
        kwargs[name] = converted
    if len(problems) > before:
        return None
    return cls(**kwargs)


def _build_or_raise(data: object, source: str) -> NodeConfig:
    problems: list[str] = []
    cfg = _build(NodeConfig, data, "", source, problems)
    if cfg is None:
        raise ConfigError(f"{source}: " + f"; {source}: ".join(problems))
    return cfg


def _apply_env(cfg: NodeConfig, env: Mapping[str, str]) -> tuple[NodeConfig, dict[str, str]]:
    """``cfg`` with the environment's overrides, and which variable set each dotted key."""
    overridden: dict[str, str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or ENV_NESTING not in var:
            continue
        path = [p.lower() for p in var[len(ENV_PREFIX) :].split(ENV_NESTING)]
        cfg = _replace_path(cfg, path, 0, env[var], var)
        overridden[".".join(path)] = var
    return cfg, overridden


def _replace_path(obj: _D, path: list[str], depth: int, text: str, var: str) -> _D:
    """Copy of ``obj`` with the key at ``path[depth:]`` set from ``text``."""
    fields = {f.name: f for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    name = path[depth]
    last = depth == len(path) - 1
    tp = _hints(type(obj))[name] if name in fields else None
    is_section = isinstance(tp, type) and dataclasses.is_dataclass(tp)
    if tp is None or is_section == last:
        # Absent, or a section named as a key, or a key with something after it.
        raise ConfigError(f"environment {var}: unknown key '{'.'.join(path)}'")
    if is_section:
        child = _replace_path(getattr(obj, name), path, depth + 1, text, var)
        return dataclasses.replace(obj, **{name: child})  # type: ignore[type-var]
    try:
        value = _from_env(text, tp)
        _run_check(fields[name], value)
    except _ValueError as exc:
        raise ConfigError(f"environment {var}: {exc}") from None
    return dataclasses.replace(obj, **{name: value})  # type: ignore[type-var]


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> NodeConfig:
    """Load the node config from ``path`` (None = built-in defaults) and apply env overrides.

    ``env`` is the environment to read ``PEERMIRROR_<SECTION>__<KEY>`` overrides from;
    None means ``os.environ`` (pass ``{}`` to ignore the environment).
    """
    data: object = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: config file is not UTF-8 text") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            if mark is not None:
                raise ConfigError(
                    f"{source}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {problem}"
                ) from None
            raise ConfigError(f"{source}: YAML syntax error: {problem}") from None
        if data is None:  # an empty file means all defaults
            data = {}
    cfg = _build_or_raise(data, source)
    cfg, overridden = _apply_env(cfg, os.environ if env is None else env)

    def where(key: str) -> str:
        var = overridden.get(key)
        return f"environment {var}" if var is not None else source

    problems = combination_problems(cfg, where)
    if problems:
        raise ConfigError("; ".join(problems))
    return _apply_k3s(cfg)


# --- rules across keys ------------------------------------------------------------------------


def combination_problems(cfg: NodeConfig, where: Callable[[str], str]) -> list[str]:
    """Combinations of keys a service would refuse at start, each as ``<source>: <key>: why``
    (``where(key)`` names the file or environment variable the key came from)."""
    d = cfg.discovery
    problems: list[str] = []
    # The DHT's own invariants (services.discovery.kademlia.DhtConfig), stated on the keys.
    if d.republish_interval >= d.record_ttl:
        problems.append(
            f"{where('discovery.republish_interval')}: discovery.republish_interval: must be "
            f"shorter than discovery.record_ttl ({d.republish_interval} >= {d.record_ttl}), "
            "or records expire before they are republished"
        )
    if d.liveness_window <= d.probe_interval:
        problems.append(
            f"{where('discovery.liveness_window')}: discovery.liveness_window: must be longer "
            f"than discovery.probe_interval ({d.liveness_window} <= {d.probe_interval})"
        )
    problems.extend(_port_clashes(cfg, where))
    return problems


_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def _listeners(cfg: NodeConfig) -> list[tuple[str, str, int]]:
    """(key, host, port) of every TCP listener of the node's three services (port 0 and unix
    sockets left out: they cannot clash on a port)."""
    out = [
        ("registry.port", cfg.registry.host, cfg.registry.port),
        ("discovery.port", cfg.discovery.host, cfg.discovery.port),
    ]
    for key, address in (
        ("registry.grpc_address", cfg.registry.grpc_address),
        ("registry.metrics_address", cfg.registry.metrics_address),
        ("discovery.local_address", cfg.discovery.local_address),
        ("discovery.metrics_address", cfg.discovery.metrics_address),
        ("pinner.grpc_address", cfg.pinner.grpc_address),
        ("pinner.metrics_address", cfg.pinner.metrics_address),
    ):
        if address and not address.startswith("unix:"):
            host, port = parse_host_port(address)
            out.append((key, host, port))
    return [(key, host.strip("[]"), port) for key, host, port in out if port != 0]


def _port_clashes(cfg: NodeConfig, where: Callable[[str], str]) -> list[str]:
    problems: list[str] = []
    listeners = _listeners(cfg)
    for i, (key, host, port) in enumerate(listeners):
        for other, other_host, other_port in listeners[:i]:
            if port == other_port and (
                host == other_host or host in _WILDCARDS or other_host in _WILDCARDS
            ):
                problems.append(
                    f"{where(key)}: {key}: port {port} is also {other}'s; the service started "
                    "second could not listen"
                )
                break
    return problems


def _apply_k3s(cfg: NodeConfig) -> NodeConfig:
    """Fill the K3s switches our config leaves null from ``node.k3s_config``, then let
    disable-default-registry-endpoint decide the pinner's default-endpoint setting."""
    k3s = cfg.k3s
    if cfg.node.k3s_config is not None:
        try:
            found = read_switches(cfg.node.k3s_config)
        except K3sConfigError as exc:
            raise ConfigError(f"node.k3s_config: {exc}") from None
        k3s = K3sSection(
            embedded_registry=(
                k3s.embedded_registry
                if k3s.embedded_registry is not None
                else found.get(EMBEDDED_REGISTRY)
            ),
            disable_default_registry_endpoint=(
                k3s.disable_default_registry_endpoint
                if k3s.disable_default_registry_endpoint is not None
                else found.get(DISABLE_DEFAULT_ENDPOINT)
            ),
        )
    pinner = cfg.pinner
    if k3s.disable_default_registry_endpoint is not None:
        pinner = dataclasses.replace(
            pinner, disable_default_endpoint=k3s.disable_default_registry_endpoint
        )
    return dataclasses.replace(cfg, k3s=k3s, pinner=pinner)


def _dump_value(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            _yaml_key(f): _dump_value(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_dump_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump_value(v) for k, v in value.items()}
    return value


def dump_config(cfg: NodeConfig) -> dict[str, Any]:
    """Plain-data form of ``cfg`` (paths as strings) that ``yaml.safe_dump`` writes and
    :func:`load_config` reads back to an equal config."""
    dumped = _dump_value(cfg)
    assert isinstance(dumped, dict)
    return dumped


def describe_config() -> list[tuple[str, str, str, str]]:
    """Every leaf key as ``(dotted key, type, default, doc)``, in schema order, for the docs."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            if "shown_default" in f.metadata:
                default = str(f.metadata["shown_default"])
            else:
                if f.default is not dataclasses.MISSING:
                    value: object = f.default
                else:
                    assert f.default_factory is not dataclasses.MISSING
                    value = f.default_factory()
                default = yaml.safe_dump(_dump_value(value), default_flow_style=True).strip()
                default = default.removesuffix("\n...").strip()
            doc = str(f.metadata["doc"])
            rows.append((f"{prefix}{_yaml_key(f)}", _type_name(tp), default, doc))

    walk(NodeConfig, "")
    return rows
