"""The `peermirror` console command: parses arguments and hands off to one subcommand module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.cli import (
    certs_cmd,
    config_cmd,
    containerd_config_cmd,
    demo_cmd,
    health_cmd,
    lookup_cmd,
    node_cmd,
    peers_cmd,
    pins_cmd,
    prefetch_cmd,
    serve_cmd,
    status_cmd,
)
from services.common.config import ConfigError

# Each `<command>_cmd` module adds its subcommand(s) with `register(subparsers)`; a new
# subcommand is a new `_cmd` module listed here (the package's other modules are helpers).
# Modules import their heavy dependencies inside their handlers so that `peermirror --help`
# and each service only pay for what they use.
COMMAND_MODULES = (
    serve_cmd,
    node_cmd,
    config_cmd,
    containerd_config_cmd,
    peers_cmd,
    lookup_cmd,
    pins_cmd,
    prefetch_cmd,
    health_cmd,
    status_cmd,
    certs_cmd,
    demo_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="peermirror",
        description=(
            "Stateless peer-to-peer OCI registry mirror for Kubernetes/K3s nodes. "
            "Run one service, the whole node, or an operator task."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        # One line naming key and file, no traceback: this is an operator mistake, not a bug.
        print(f"peermirror: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
