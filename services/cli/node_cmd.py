"""`peermirror node`: run discovery, registry and pinner together as supervised child processes."""

from __future__ import annotations

import argparse
import asyncio

from services.cli.args import Subparsers, add_command, add_config_option, load_node_config
from services.common.logsetup import configure_logging, get_logger
from services.common.node_supervisor import SERVICES, NodeSupervisor, child_command


def register(subparsers: Subparsers) -> None:
    """Add the `node` subcommand."""
    add_command(
        subparsers,
        "node",
        _run,
        help="run all three services as supervised child processes",
        description=(
            "Run discovery, registry and pinner as child processes with the same config. "
            "A child that dies is restarted with a growing delay; SIGTERM or SIGINT is passed "
            "on to every child and the node exits once they stopped (0 when all exited cleanly)."
        ),
        options=[add_config_option],
    )


def _run(args: argparse.Namespace) -> int:
    # Validate once here so a broken config is reported once, not by three crash-looping children.
    cfg = load_node_config(args)
    configure_logging("node", fmt=cfg.log.format, level=cfg.log.level)
    log = get_logger(__name__)
    commands = {name: child_command(name, args.config) for name in SERVICES}
    log.info("node starting", node=cfg.node.name, children=list(commands))
    code = asyncio.run(NodeSupervisor(commands, log).run())
    log.info("node stopped", exit_code=code)
    return code
