"""`peermirror discovery|registry|pinner`: run one service in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os

from services.cli.args import Subparsers, add_config_option, load_node_config
from services.common.config import ConfigError
from services.common.logsetup import configure_logging, get_logger
from services.common.node_supervisor import follow_supervisor

_SERVICES = {
    "discovery": "publish and find which nodes hold which content (peer-to-peer)",
    "registry": "serve the OCI Distribution pull API containerd uses as its mirror",
    "pinner": "the node's containerd agent: advertise, import and pin images",
}


def register(subparsers: Subparsers) -> None:
    """Add one subcommand per service."""
    for name, what in _SERVICES.items():
        parser = subparsers.add_parser(
            name,
            help=f"run the {name} service: {what}",
            description=(
                f"Run the {name} service in the foreground ({what}). Logs JSON lines; "
                "stops cleanly on SIGTERM or SIGINT."
            ),
        )
        add_config_option(parser)
        parser.set_defaults(handler=_run, service=name)


def _run(args: argparse.Namespace) -> int:
    name: str = args.service
    follow_supervisor(os.environ)
    cfg = load_node_config(args)
    configure_logging(name, fmt=cfg.log.format, level=cfg.log.level)
    # Imported here so each service only loads its own dependencies (idle memory budget).
    module = importlib.import_module(f"services.{name}.service")
    from services.common.grpc_server import AddressInUseError

    try:
        asyncio.run(module.run(cfg))
    except AddressInUseError as exc:
        get_logger(__name__).error("failed to start", service=name, error=str(exc))
        return 1
    except ConfigError as exc:
        # Found at start (a TLS file that cannot be read, ...): the key is named, and the
        # operator also learns which config file named it.
        source = "defaults" if args.config is None else str(args.config)
        raise ConfigError(f"{source}: {exc}") from None
    return 0
