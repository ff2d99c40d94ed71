"""`peermirror peers`: the nodes in the local discovery service's routing table."""

from __future__ import annotations

import argparse
import json
import sys
import time

from services.cli.args import Subparsers, add_command
from services.cli.discovery_client import add_local_api_options, channel, describe_error


def register(subparsers: Subparsers) -> None:
    """Add the `peers` subcommand."""
    add_command(
        subparsers,
        "peers",
        _run,
        help="list the peers this node's discovery service knows",
        description=(
            "List the nodes in the local discovery service's routing table, closest to this "
            "node first, with when each was last heard from."
        ),
        options=[add_local_api_options],
    )


def _run(args: argparse.Namespace) -> int:
    import grpc

    from services.cli.discovery_client import local_address
    from services.common.genproto.peermirror.discovery.v1 import local_pb2 as pb
    from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as pb_grpc

    address = local_address(args)
    try:
        with channel(args) as ch:
            stub = pb_grpc.LocalDiscoveryStub(ch)
            stats = stub.Stats(pb.StatsRequest(), timeout=args.timeout)
            reply = stub.ListPeers(pb.ListPeersRequest(), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"peermirror peers: {describe_error(address, exc)}", file=sys.stderr)
        return 1
    now = time.time()
    rows = [
        {
            "node_id": p.contact.node_id.hex(),
            "address": p.contact.address,
            "discovery_port": p.contact.discovery_port,
            "registry_port": p.contact.registry_port,
            "last_seen_s_ago": round(max(0.0, now - p.last_seen.ToNanoseconds() / 1e9), 1),
        }
        for p in reply.peers
    ]
    if args.json:
        print(json.dumps({"node_id": stats.node_id.hex(), "peers": rows}, indent=2))
        return 0
    print(f"node {stats.node_id.hex()}: {len(rows)} peer(s)")
    if rows:
        print(f"{'NODE ID':<16} {'ADDRESS':<40} {'DISCOVERY':>9} {'REGISTRY':>8} {'SEEN':>8}")
    for row in rows:
        print(
            f"{str(row['node_id'])[:16]:<16} {row['address']!s:<40} "
            f"{row['discovery_port']!s:>9} {row['registry_port']!s:>8} "
            f"{row['last_seen_s_ago']!s:>7}s"
        )
    return 0
