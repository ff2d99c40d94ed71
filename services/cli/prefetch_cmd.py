"""`peermirror prefetch REF [--nodes ...]`: asks nodes' pinners to pull an image from their peers
ahead of a rollout, all at once, showing each node's progress."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.cli.args import (
    Subparsers,
    add_command,
    add_config_option,
    add_timeout_option,
    load_node_config,
)

if TYPE_CHECKING:
    from services.cli.progress import ProgressView, TaskState
    from services.common.genproto.peermirror.pinner.v1 import pinner_pb2

# A large image over a slow link can take many minutes; the pinner bounds each pull itself too.
DEFAULT_TIMEOUT_S = 1800.0


def register(subparsers: Subparsers) -> None:
    """Add the `prefetch` subcommand."""
    parser = add_command(
        subparsers,
        "prefetch",
        _run,
        help="warm nodes with an image ahead of a rollout",
        description=(
            "Ask each node's pinner to pull REF through its containerd (so its mirror and its "
            "peers serve the content), concurrently, with progress per node: a bar on a "
            "terminal, plain lines otherwise. Exits 1 when any node failed."
        ),
    )
    parser.add_argument("ref", metavar="REF", help="image reference (tag or digest)")
    parser.add_argument(
        "--nodes",
        metavar="ADDR,...",
        default=None,
        help=(
            "comma-separated pinner gRPC addresses (host:port or unix:/path) "
            "(default: this node's pinner.grpc_address from the config)"
        ),
    )
    add_timeout_option(parser, DEFAULT_TIMEOUT_S, "give up on a node after this long")
    add_config_option(parser)


def parse_nodes(text: str) -> list[str]:
    """`a,b, c` -> ['a', 'b', 'c'], blanks and repeats dropped; ValueError when none is left."""
    nodes: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part and part not in nodes:
            nodes.append(part)
    if not nodes:
        raise ValueError("--nodes names no address")
    return nodes


_PHASE_NAMES = {1: "started", 2: "pulling", 3: "done"}


def task_state(label: str, msg: pinner_pb2.PrefetchProgress) -> TaskState:
    """A node's progress message as the progress view shows it."""
    from services.cli.progress import TaskState
    from services.common.genproto.peermirror.pinner.v1 import pinner_pb2

    done = msg.phase == pinner_pb2.PREFETCH_PHASE_DONE
    return TaskState(
        label=label,
        phase=_PHASE_NAMES.get(msg.phase, "unknown"),
        done=msg.bytes_done,
        total=msg.bytes_total,
        elapsed=msg.elapsed_seconds,
        ok=True if done else None,
        detail=short_id(msg.image_id) if done else "",
    )


def short_id(image_id: str) -> str:
    """`sha256:<64 hex>` -> `image sha256:<12 hex>` (as `ctr`/`crictl` abbreviate ids)."""
    algorithm, _, hexpart = image_id.partition(":")
    return f"image {algorithm}:{hexpart[:12]}" if hexpart else image_id


async def prefetch_node(address: str, ref: str, view: ProgressView, rpc_timeout: float) -> bool:
    """Stream one node's prefetch into `view`; whether it ended with the image present."""
    import grpc

    from services.common.genproto.peermirror.pinner.v1 import pinner_pb2, pinner_pb2_grpc

    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pinner_pb2_grpc.PinnerStub(channel)
            call = stub.Prefetch(pinner_pb2.PrefetchRequest(reference=ref), timeout=rpc_timeout)
            finished = False
            async for msg in call:
                view.update(task_state(address, msg))
                finished = msg.phase == pinner_pb2.PREFETCH_PHASE_DONE
    except grpc.aio.AioRpcError as err:
        view.fail(address, f"{err.code().name}: {err.details()}")
        return False
    if not finished:
        view.fail(address, "the pinner ended the stream before the image was present")
    return finished


async def prefetch_all(
    nodes: Sequence[str], ref: str, view: ProgressView, rpc_timeout: float
) -> list[bool]:
    """Prefetch `ref` on every node concurrently; one outcome per node, in order."""
    import asyncio

    try:
        return list(
            await asyncio.gather(*(prefetch_node(n, ref, view, rpc_timeout) for n in nodes))
        )
    finally:
        view.close()


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from services.cli.progress import ProgressView

    try:
        nodes = (
            parse_nodes(args.nodes)
            if args.nodes is not None
            else [load_node_config(args).pinner.grpc_address]
        )
    except ValueError as exc:
        print(f"peermirror prefetch: {exc}", file=sys.stderr)
        return 2
    view = ProgressView(sys.stdout, nodes)
    results = asyncio.run(prefetch_all(nodes, args.ref, view, args.timeout))
    failed = [n for n, ok in zip(nodes, results, strict=True) if not ok]
    if failed:
        print(
            f"peermirror prefetch: {len(failed)} of {len(nodes)} node(s) failed: "
            + ", ".join(failed),
            file=sys.stderr,
        )
        return 1
    return 0
