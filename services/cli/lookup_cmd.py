"""`peermirror lookup`: which nodes provide a digest or tag reference, asked of local discovery."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from services.cli.args import Subparsers, add_command
from services.cli.discovery_client import add_local_api_options, channel, describe_error
from services.common.hostport import join_host_port


def register(subparsers: Subparsers) -> None:
    """Add the `lookup` subcommand."""
    parser = add_command(
        subparsers,
        "lookup",
        _run,
        help="find the nodes that provide a digest or tag reference",
        description=(
            "Ask the local discovery service which other nodes provide KEY, a digest "
            "(sha256:...) or a tag reference (<registry>/<name>:<tag>), exactly as the pinner "
            "advertises it. Prints one provider per line, then the node fetching KEY from "
            "upstream if one holds its fetch lease; exits 1 when there is neither."
        ),
    )
    parser.add_argument("key", metavar="KEY", help="digest or tag reference")
    parser.add_argument(
        "--limit", type=int, default=0, help="most providers to return (default: server's)"
    )
    add_local_api_options(parser)


def _run(args: argparse.Namespace) -> int:
    import grpc

    from services.cli.discovery_client import local_address
    from services.common.genproto.peermirror.discovery.v1 import local_pb2 as pb
    from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as pb_grpc

    if args.limit < 0:
        print("peermirror lookup: --limit must not be negative", file=sys.stderr)
        return 2
    address = local_address(args)
    providers = []
    try:
        with channel(args) as ch:
            stub = pb_grpc.LocalDiscoveryStub(ch)
            request = pb.FindProvidersRequest(key=args.key, limit=args.limit)
            for reply in stub.FindProviders(request, timeout=args.timeout):
                p = reply.provider
                registry = join_host_port(p.address, p.registry_port)
                providers.append(
                    {
                        "node_id": p.node_id.hex(),
                        "address": p.address,
                        "registry": registry,
                        "in_flight": reply.in_flight,
                    }
                )
                if not args.json:
                    fetching = "  (fetching from upstream)" if reply.in_flight else ""
                    print(f"{registry}  node {p.node_id.hex()}{fetching}", flush=True)
            lease = _lease(stub, args)
    except grpc.RpcError as exc:
        print(f"peermirror lookup: {describe_error(address, exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"key": args.key, "providers": providers, "lease": lease}, indent=2))
    elif lease is not None:
        who = "this node" if lease["mine"] else f"{lease['registry']}  node {lease['node_id']}"
        print(
            f"in flight: fetched from upstream by {who}, {lease['waiters']} other node(s) "
            f"waiting, lease {lease['ttl_seconds']:g}s left"
        )
    if not providers and lease is None:
        print(f"peermirror lookup: no provider found for {args.key}", file=sys.stderr)
        return 1
    return 0


def _lease(stub: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """Who holds KEY's fetch lease (None: nobody, or a discovery without leases)."""
    import grpc

    from services.common.genproto.peermirror.discovery.v1 import local_pb2 as pb

    try:
        reply = stub.GetLease(pb.GetLeaseRequest(key=args.key), timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE):
            return None
        raise
    if not reply.held:
        return None
    h = reply.holder
    return {
        "mine": reply.mine,
        "node_id": h.node_id.hex() if not reply.mine else None,
        "registry": join_host_port(h.address, h.registry_port) if not reply.mine else None,
        "ttl_seconds": round(reply.ttl.ToNanoseconds() / 1e9, 1),
        "waiters": reply.waiters,
    }
