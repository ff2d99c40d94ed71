"""`peermirror lookup`: which nodes provide a digest or tag reference, asked of local discovery."""

from __future__ import annotations

import argparse
import json
import sys

from services.cli.args import Subparsers
from services.cli.discovery_client import add_local_api_options, channel, describe_error


def register(subparsers: Subparsers) -> None:
    """Add the `lookup` subcommand."""
    parser = subparsers.add_parser(
        "lookup",
        help="find the nodes that provide a digest or tag reference",
        description=(
            "Ask the local discovery service which other nodes provide KEY, a digest "
            "(sha256:...) or a tag reference (<registry>/<name>:<tag>), exactly as the pinner "
            "advertises it. Prints one provider per line; exits 1 when none is found."
        ),
    )
    parser.add_argument("key", metavar="KEY", help="digest or tag reference")
    parser.add_argument(
        "--limit", type=int, default=0, help="most providers to return (default: server's)"
    )
    add_local_api_options(parser)
    parser.set_defaults(handler=_run)


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
                host = f"[{p.address}]" if ":" in p.address else p.address
                providers.append(
                    {
                        "node_id": p.node_id.hex(),
                        "address": p.address,
                        "registry": f"{host}:{p.registry_port}",
                    }
                )
                if not args.json:
                    print(f"{host}:{p.registry_port}  node {p.node_id.hex()}", flush=True)
    except grpc.RpcError as exc:
        print(f"peermirror lookup: {describe_error(address, exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"key": args.key, "providers": providers}, indent=2))
    if not providers:
        print(f"peermirror lookup: no provider found for {args.key}", file=sys.stderr)
        return 1
    return 0
