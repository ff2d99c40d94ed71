"""Argument pieces shared by several `peermirror` subcommands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TypeAlias

from services.common.config import NodeConfig, load_config

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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


def load_node_config(args: argparse.Namespace) -> NodeConfig:
    """Load the config named by `--config`, with this process's environment overrides."""
    path: Path | None = args.config
    return load_config(path, os.environ)
