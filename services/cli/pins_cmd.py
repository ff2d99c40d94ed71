"""`peermirror pins`, `pin <ref>`, `unpin <ref>`: list and change image pins via the pinner API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.cli.args import (
    Subparsers,
    add_address_option,
    add_command,
    add_config_option,
    load_node_config,
)

if TYPE_CHECKING:
    from services.common.genproto.peermirror.pinner.v1 import pinner_pb2_grpc

RPC_TIMEOUT_S = 30.0


def register(subparsers: Subparsers) -> None:
    """Add the `pins`, `pin` and `unpin` subcommands."""
    add_command(
        subparsers,
        "pins",
        _list,
        help="list pinned images",
        description=(
            "List the images pinned in containerd (io.cri-containerd.pinned=pinned): name, "
            "digest, whether the air-gap import manages the pin, and the file it came from."
        ),
        options=[_common],
    )
    add_command(
        subparsers,
        "pin",
        _pin,
        help="pin an image so kubelet's image GC keeps it",
        description=(
            "Pin an image already present in containerd. Manual pins survive pinner restarts; "
            "short names are normalised (alpine:3.19 -> docker.io/library/alpine:3.19)."
        ),
        options=[_ref, _common],
    )
    add_command(
        subparsers,
        "unpin",
        _unpin,
        help="remove an image's pin",
        description="Remove the pin of an image (manual or set by the air-gap import).",
        options=[_ref, _common],
    )


def _ref(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", help="image name or reference")


def _common(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    add_address_option(parser, "pinner gRPC API", "pinner.grpc_address")


def _address(args: argparse.Namespace) -> str:
    if args.address:
        return str(args.address)
    return load_node_config(args).pinner.grpc_address


def _call(args: argparse.Namespace, action: str) -> int:
    import grpc

    from services.common.genproto.peermirror.pinner.v1 import pinner_pb2_grpc

    address = _address(args)
    with grpc.insecure_channel(address) as channel:
        stub = pinner_pb2_grpc.PinnerStub(channel)
        try:
            return _run(stub, action, args)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            detail = err.details() if isinstance(err, grpc.Call) else str(err)
            name = code.name if code is not None else "ERROR"
            print(f"peermirror: {action} failed ({name}): {detail}", file=sys.stderr)
            return 3 if code == grpc.StatusCode.NOT_FOUND else 1


def _run(stub: pinner_pb2_grpc.PinnerStub, action: str, args: argparse.Namespace) -> int:
    from services.common.genproto.peermirror.pinner.v1 import pinner_pb2

    if action == "pins":
        pins = stub.ListPins(pinner_pb2.ListPinsRequest(), timeout=RPC_TIMEOUT_S).pins
        rows = [
            (p.name, p.digest, "managed" if p.managed else "manual", p.source or "-") for p in pins
        ]
        print(render_table(("NAME", "DIGEST", "PIN", "SOURCE"), rows), end="")
        return 0
    if action == "pin":
        pin = stub.Pin(pinner_pb2.PinRequest(ref=args.ref), timeout=RPC_TIMEOUT_S).pin
        print(f"pinned {pin.name} {pin.digest}")
        return 0
    resp = stub.Unpin(pinner_pb2.UnpinRequest(ref=args.ref), timeout=RPC_TIMEOUT_S)
    print(f"unpinned {args.ref}" if resp.was_pinned else f"{args.ref} was not pinned")
    return 0


def render_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Left-aligned columns separated by two spaces, header first."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "".join(line + "\n" for line in lines)


def _list(args: argparse.Namespace) -> int:
    return _call(args, "pins")


def _pin(args: argparse.Namespace) -> int:
    return _call(args, "pin")


def _unpin(args: argparse.Namespace) -> int:
    return _call(args, "unpin")
