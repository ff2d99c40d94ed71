"""`peermirror status`: this node's services at a glance (health, version, uptime, peers, keys,
pins, mirror hit rate), for operators or, with `--json`, for scripts (schema in
services.common.status.report).

Each service is asked over its node-local addresses from `--config`: the standard gRPC health
Check, its introspection or status RPC, and its /metrics listener (version and start time). A
service that does not answer is shown DOWN and the command exits 1; so does one not ready.
"""

from __future__ import annotations

import argparse
import json

from services.cli.args import (
    Subparsers,
    add_command,
    add_config_option,
    add_timeout_option,
    load_node_config,
)
from services.common.status.observe import DEFAULT_TIMEOUT, observe
from services.common.status.report import (
    build_report,
    exit_code,
    render_text,
)


def register(subparsers: Subparsers) -> None:
    """Add the `status` subcommand."""
    parser = add_command(
        subparsers,
        "status",
        _run,
        help="show this node's services: health, version, uptime, peers, keys, hit rate",
        description=(
            "Ask this node's registry, discovery and pinner (node-local addresses from the "
            "config) how they are. Exit 0 when all three are SERVING, 1 otherwise."
        ),
        options=[add_config_option],
    )
    parser.add_argument("--json", action="store_true", help="print the JSON document instead")
    add_timeout_option(parser, DEFAULT_TIMEOUT, "deadline of each call")


def _run(args: argparse.Namespace) -> int:
    report = build_report(observe(load_node_config(args), args.timeout))
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return exit_code(report)
