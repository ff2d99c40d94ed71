"""`peermirror health`: one standard gRPC health Check, for kubelet exec probes and operators.

Readiness (the default) passes only on SERVING. Liveness (`--live`) passes on any health answer,
NOT_SERVING included: a discovery node still looking for its first peer, or a pinner waiting for
containerd, is alive, and restarting it would not help. For the registry the probe is its HTTP
`/readyz` (or `/livez`), over mutual TLS with this node's certificate when TLS is on, which
kubelet's own `httpGet` probe cannot do (it presents no client certificate).

Kubernetes `grpc:` probes dial the pod IP, which for a hostNetwork pod is the node's address; the
node-local APIs listen on 127.0.0.1 only (they must never face peers), so kubelet cannot reach
them that way. An exec probe runs inside the pod's network namespace, which is the host's, and
reaches 127.0.0.1 like every other local caller.
"""

from __future__ import annotations

import argparse
import sys

from services.cli.args import (
    Subparsers,
    add_command,
    add_config_option,
    add_timeout_option,
    load_node_config,
)
from services.common.config import NodeConfig
from services.common.hostport import join_host_port
from services.common.status.observe import check

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
DEFAULT_TIMEOUT = 3.0

# The node-local gRPC address of each service, as the node config names it.
LOCAL_ADDRESS_KEYS: dict[str, str] = {
    "discovery": "discovery.local_address",
    "registry": "registry.grpc_address",
    "pinner": "pinner.grpc_address",
}
# The registry is probed on its HTTP health paths instead (they follow its HTTP listener).
HTTP_TARGET = "registry"
READY_PATH = "/readyz"
LIVE_PATH = "/livez"

_WILDCARD_HOSTS = ("", "0.0.0.0", "[::]")


def register(subparsers: Subparsers) -> None:
    """Add the `health` subcommand."""
    parser = add_command(
        subparsers,
        "health",
        _run,
        help="check a service's gRPC health (exit 0 when SERVING)",
        description=(
            "Ask a gRPC server for its standard health status (grpc.health.v1.Health/Check) and "
            "exit 0 when it answers SERVING, 1 otherwise (not serving, unreachable, timed out). "
            "The address is --address, or the node-local address the config gives SERVICE."
        ),
    )
    parser.add_argument(
        "target",
        nargs="?",
        choices=sorted(LOCAL_ADDRESS_KEYS),
        metavar="SERVICE",
        help=(
            "discovery or pinner: check its node-local gRPC API from the config; registry: "
            "GET /readyz (/livez with --live) on its HTTP port"
        ),
    )
    parser.add_argument("--address", help="host:port or unix:/path to check instead")
    parser.add_argument(
        "--service",
        default="",
        help="health service name to ask about (default: the server as a whole)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="liveness: exit 0 on any health answer, NOT_SERVING included",
    )
    add_timeout_option(parser, DEFAULT_TIMEOUT, "seconds to wait for the answer")
    add_config_option(parser)


def local_address(cfg: NodeConfig, service: str) -> str:
    """The node-local gRPC listen address of `service` in `cfg`."""
    section, key = LOCAL_ADDRESS_KEYS[service].split(".")
    value: str = getattr(getattr(cfg, section), key)
    return value


def passes(status: str, live: bool) -> bool:
    """Whether a probe passes: readiness needs SERVING; liveness any answer from the server."""
    if live:
        return status in ("SERVING", "NOT_SERVING")
    return status == "SERVING"


def registry_url(cfg: NodeConfig, live: bool) -> str:
    """The registry health URL a local probe asks (loopback when it listens everywhere)."""
    host = cfg.registry.host
    host = "127.0.0.1" if host in _WILDCARD_HOSTS or host == "::" else host
    scheme = "https" if cfg.tls.enabled else "http"
    path = LIVE_PATH if live else READY_PATH
    return f"{scheme}://{join_host_port(host, cfg.registry.port)}{path}"


def check_http(url: str, cfg: NodeConfig, timeout: float = DEFAULT_TIMEOUT) -> str:
    """`HTTP <status>` of a GET of `url`, or `UNREACHABLE: <why>`."""
    import ssl
    import urllib.error
    import urllib.request

    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https:"):
        from services.common.tls import client_context, tls_files

        files = tls_files(cfg)
        assert files is not None
        context = client_context(files)
        # The chain is still checked against the cluster CA; the name is not, as the
        # certificate names the node's address and the probe dials loopback.
        context.check_hostname = False
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as reply:
            return f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"UNREACHABLE: {reason}"


def _run(args: argparse.Namespace) -> int:
    address: str | None = args.address
    if address is None:
        if args.target is None:
            print("peermirror health: give SERVICE or --address", file=sys.stderr)
            return EXIT_USAGE
        cfg = load_node_config(args)
        if args.target == HTTP_TARGET:
            url = registry_url(cfg, args.live)
            answer = check_http(url, cfg, args.timeout)
            print(f"{url}: {answer}")
            return EXIT_PASS if answer == "HTTP 200" else EXIT_FAIL
        address = local_address(cfg, args.target)
    status = check(address, args.service, args.timeout)
    print(f"{address}: {status}")
    return EXIT_PASS if passes(status, args.live) else EXIT_FAIL
