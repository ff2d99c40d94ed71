"""Argument pieces shared by several `peermirror` subcommands."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from services.common.config import NodeConfig, load_config

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler = Callable[[argparse.Namespace], int]
AddOptions = Callable[[argparse.ArgumentParser], None]


def add_command(
    subparsers: Subparsers,
    name: str,
    handler: Handler,
    *,
    help: str,
    description: str,
    options: Sequence[AddOptions] = (),
) -> argparse.ArgumentParser:
    """A subcommand: its parser with help and description, the shared `options` added, and the
    handler `main` calls; the caller adds the command's own arguments to what is returned."""
    parser = subparsers.add_parser(name, help=help, description=description)
    for add in options:
        add(parser)
    parser.set_defaults(handler=handler)
    return parser


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """The `--config FILE` option every node-level command takes."""
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        metavar="FILE",
        default=None,
        help=(
            "node config YAML; PEERMIRROR_<SECTION>__<KEY> environment variables override it "
            "(default: built-in defaults plus the environment)"
        ),
    )


def add_address_option(parser: argparse.ArgumentParser, what: str, key: str) -> None:
    """`--address HOST:PORT`: the API `what` to call instead of the one config key `key` names."""
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        default=None,
        help=f"{what} address (default: {key} from the config)",
    )


def add_timeout_option(parser: argparse.ArgumentParser, default: float, what: str) -> None:
    """`--timeout SECONDS` with its default in the help: `what` says what it bounds."""
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help=f"{what} (default {default:g})",
    )


def load_node_config(args: argparse.Namespace) -> NodeConfig:
    """Load the config named by `--config`, with this process's environment overrides."""
    path: Path | None = args.config
    return load_config(path, os.environ)
