"""`peermirror demo`: a local mesh of peermirror nodes on this machine, for trying it out
(`make run`) — no root, no containerd, loopback only."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.cli.args import Subparsers, add_command
from services.cli.demo_plan import DEFAULT_BASE_PORT, DEFAULT_NODES, DEMO_IMAGE

MIB = 1024 * 1024


def register(subparsers: Subparsers) -> None:
    """Add the `demo` subcommand."""
    parser = add_command(
        subparsers,
        "demo",
        _run,
        help="run a local mesh of nodes and pull an image from one node through another",
        description=(
            f"Start NODES peermirror nodes on 127.0.0.1 (each its discovery, registry and "
            f"pinner over an OCI-layout store under WORKDIR; no root, no containerd), seed "
            f"{DEMO_IMAGE} on node 1, pull it through the last node's registry with skopeo "
            "(or a built-in client when skopeo is missing), print which node served which "
            "blob, then keep the mesh up until Ctrl-C. WORKDIR is wiped on every start. "
            "PEERMIRROR_<SECTION>__<KEY> overrides are ignored: every node's config is "
            "generated (WORKDIR/node<i>/node.yaml)."
        ),
    )
    parser.add_argument(
        "--nodes", type=int, default=DEFAULT_NODES, help="number of nodes (default: %(default)s)"
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help=(
            "node i listens on BASE+i (registry), BASE+100+i (registry gRPC), BASE+200+i "
            "(discovery), BASE+300+i (discovery local), BASE+400+i (pinner) "
            "(default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".run/mesh"),
        help="directory for the nodes' stores, configs and logs (default: %(default)s)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="stop the mesh after the pull and the summary instead of waiting for Ctrl-C",
    )
    parser.add_argument(
        "--client",
        choices=("auto", "skopeo", "builtin"),
        default="auto",
        help="pull client: skopeo when installed (auto), or the built-in one",
    )
    parser.add_argument(
        "--layers", type=int, default=3, help="layers of the seeded image (default: %(default)s)"
    )
    parser.add_argument(
        "--layer-mib",
        type=float,
        default=8.0,
        help="size of each layer in MiB (default: %(default)s)",
    )


def _run(args: argparse.Namespace) -> int:
    # Imported here: `peermirror --help` and the services need none of the demo's machinery.
    from services.cli.demo_mesh import DemoOptions, main

    if args.layers < 1 or args.layer_mib <= 0:
        print("peermirror demo: --layers must be >= 1 and --layer-mib > 0")
        return 2
    options = DemoOptions(
        nodes=args.nodes,
        base_port=args.base_port,
        workdir=args.workdir.resolve(),
        once=args.once,
        client=args.client,
        layers=args.layers,
        layer_size=int(args.layer_mib * MIB),
    )
    return main(options)
