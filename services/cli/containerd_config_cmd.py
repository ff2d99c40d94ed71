"""`peermirror containerd-config`: render a K3s registries.yaml into containerd's certs.d."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.cli.args import Subparsers, add_command

EXIT_INVALID = 2


def register(subparsers: Subparsers) -> None:
    """Add `containerd-config`."""
    parser = add_command(
        subparsers,
        "containerd-config",
        _run,
        help="write containerd certs.d/<host>/hosts.toml files from a registries.yaml",
        description=(
            "Render a K3s registries.yaml into containerd hosts.toml files (the embedded "
            "mirror first, then the registry's endpoints, upstream last), written atomically "
            "into --out. Only directories peermirror or K3s generated are replaced (only "
            "peermirror's removed); hand-written ones are left alone. An invalid registries.yaml "
            "is reported with the key at fault and nothing is changed. The write holds a lock "
            "on --out/.peermirror.lock shared with the pinner, waiting while the pinner writes."
        ),
    )
    parser.add_argument(
        "--registries", type=Path, required=True, metavar="FILE", help="K3s registries.yaml"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="containerd certs.d directory"
    )
    parser.add_argument(
        "--missing-ok",
        action="store_true",
        help="treat a missing registries file as empty (removes generated directories)",
    )
    mirror = parser.add_argument_group("embedded mirror (this node's registry)")
    mirror.add_argument("--registry-address", default="127.0.0.1", metavar="HOST")
    mirror.add_argument("--registry-port", type=int, default=6443, metavar="N")
    mirror.add_argument("--no-tls", action="store_true", help="the registry serves plain http")
    mirror.add_argument("--ca", metavar="FILE", help="CA that signed the registry's certificate")
    mirror.add_argument("--client-cert", metavar="FILE", help="client certificate to present")
    mirror.add_argument("--client-key", metavar="FILE", help="key of --client-cert")
    mirror.add_argument(
        "--no-mirror",
        action="store_true",
        help="leave the embedded mirror out (the node does not take part)",
    )
    mirror.add_argument(
        "--digests-only",
        action="store_true",
        help="the embedded mirror may pull digests but not resolve tags",
    )
    target = parser.add_argument_group("containerd")
    target.add_argument(
        "--disable-default-endpoint",
        action="store_true",
        help="K3s disable-default-registry-endpoint: mirrored registries lose their upstream",
    )
    target.add_argument("--flavour", choices=("k3s", "upstream"), default="k3s")
    target.add_argument(
        "--containerd-version", default="1.7", metavar="X.Y", help="(dial_timeout needs >= 2.1)"
    )
    target.add_argument("--dial-timeout", type=float, metavar="SECONDS")
    target.add_argument(
        "--server", metavar="URL", help="replace every registry's default endpoint with URL"
    )


def _run(args: argparse.Namespace) -> int:
    from services.common.config import parse_major_minor
    from services.common.k3s.registries import RegistriesError
    from services.pinner.hosts_toml import HostsOptions
    from services.pinner.hosts_writer import write_containerd_config

    if args.client_key and not args.client_cert:
        print("peermirror: --client-key needs --client-cert", file=sys.stderr)
        return EXIT_INVALID
    try:
        version = parse_major_minor(args.containerd_version)
    except ValueError as exc:
        print(f"peermirror: --containerd-version: {exc}", file=sys.stderr)
        return EXIT_INVALID
    opts = HostsOptions(
        embedded_mirror=not args.no_mirror,
        mirror_address=args.registry_address,
        mirror_port=args.registry_port,
        mirror_tls=not args.no_tls,
        ca_file=args.ca,
        client_cert_file=args.client_cert,
        client_key_file=args.client_key,
        mirror_resolve=not args.digests_only,
        disable_default_endpoint=args.disable_default_endpoint,
        server_override=args.server,
        containerd_version=version,
        flavour=args.flavour,
        dial_timeout=args.dial_timeout,
    )
    try:
        files = write_containerd_config(args.registries, args.out, opts, missing_ok=args.missing_ok)
    except RegistriesError as exc:
        print(f"peermirror: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        print(f"peermirror: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0
