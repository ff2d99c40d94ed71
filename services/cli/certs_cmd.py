"""`peermirror certs`: create the cluster CA and the node certificates signed by it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.cli.args import Subparsers

DEFAULT_CA_DIR = Path("peermirror-ca")


def register(subparsers: Subparsers) -> None:
    """Add the `certs` subcommand and its `init` and `node` actions."""
    parser = subparsers.add_parser(
        "certs",
        help="create the cluster CA and node certificates (mutual TLS between nodes)",
        description=(
            "Create the cluster CA once ('init'), then one certificate per node ('node'). Copy "
            "a node's directory (node.crt, node.key, ca.crt) to <node.data_dir>/tls on that "
            "node, or name the files in the tls section of its config. Keep ca.key off the nodes."
        ),
    )
    actions = parser.add_subparsers(dest="certs_action", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="create the cluster CA (ca.crt, ca.key)")
    init.add_argument(
        "--out", type=Path, default=DEFAULT_CA_DIR, help=f"directory (default: {DEFAULT_CA_DIR})"
    )
    init.add_argument("--force", action="store_true", help="replace a CA already there")
    init.set_defaults(handler=_init)
    node = actions.add_parser(
        "node", help="create a node certificate signed by the cluster CA (node.crt, node.key)"
    )
    node.add_argument("--name", required=True, help="node name (certificate CN and DNS SAN)")
    node.add_argument(
        "--ip", required=True, help="IP address peers reach the node at (IP SAN; its identity)"
    )
    node.add_argument("--dns", action="append", default=[], help="extra DNS name (repeatable)")
    node.add_argument(
        "--ca-dir",
        type=Path,
        default=DEFAULT_CA_DIR,
        help=f"directory of the cluster CA (default: {DEFAULT_CA_DIR})",
    )
    node.add_argument("--out", type=Path, required=True, help="directory for the node's files")
    node.set_defaults(handler=_node)


def _init(args: argparse.Namespace) -> int:
    from services.common import cert_names, pki

    out: Path = args.out
    if (out / cert_names.CA_KEY_FILE).exists() and not args.force:
        print(
            f"peermirror certs init: {out / cert_names.CA_KEY_FILE} exists; every node certificate "
            "signed by it would stop being trusted if it were replaced (use --force to do so)",
            file=sys.stderr,
        )
        return 1
    cert_path, key_path = pki.write_ca(out, pki.create_ca())
    print(f"wrote {cert_path} and {key_path} (keep the key off the nodes)")
    return 0


def _node(args: argparse.Namespace) -> int:
    import ipaddress

    from services.common import pki

    try:
        ip = str(ipaddress.ip_address(args.ip))
    except ValueError:
        print(f"peermirror certs node: --ip: not an IP address: {args.ip!r}", file=sys.stderr)
        return 2
    try:
        ca = pki.load_ca(args.ca_dir)
    except pki.PkiError as exc:
        print(f"peermirror certs node: cluster CA: {exc}", file=sys.stderr)
        return 1
    issued = pki.issue_node(ca, args.name, ip, dns_names=tuple(args.dns))
    paths = pki.write_node(args.out, issued, ca.cert)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
