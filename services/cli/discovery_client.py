"""What the discovery CLI commands share: reaching a node's LocalDiscovery API."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from services.cli.args import (
    add_address_option,
    add_config_option,
    add_timeout_option,
    load_node_config,
)

if TYPE_CHECKING:  # grpc is imported by the handlers only, keeping `peermirror --help` light
    import grpc

# Seconds a command waits for the local discovery service before giving up.
DEFAULT_TIMEOUT = 10.0


def add_local_api_options(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--address` (overrides discovery.local_address) and `--timeout`."""
    add_config_option(parser)
    add_address_option(parser, "LocalDiscovery API", "discovery.local_address")
    add_timeout_option(parser, DEFAULT_TIMEOUT, "deadline of the call")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def local_address(args: argparse.Namespace) -> str:
    """The LocalDiscovery address the command talks to."""
    if args.address:
        return str(args.address)
    return load_node_config(args).discovery.local_address


def channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the local API; environment proxies never apply to it."""
    import grpc

    from services.common.discovery_router import local_channel_options

    return grpc.insecure_channel(local_address(args), options=local_channel_options())


def describe_error(address: str, exc: grpc.RpcError) -> str:
    """One line for a failed call (no traceback: usually the service is not running)."""
    import grpc

    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"discovery service not reachable at {address}: {details}"
    name = code.name if code is not None else "error"
    return f"discovery service at {address}: {name}: {details}"
