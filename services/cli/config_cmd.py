"""`peermirror config ...`: validate a node config and show the effective or default settings."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import yaml

from services.cli.args import Subparsers, add_config_option, load_node_config
from services.common.config import describe_config, dump_config, load_config


def register(subparsers: Subparsers) -> None:
    """Add `config check` and `config show-defaults`."""
    parser = subparsers.add_parser(
        "config",
        help="validate a config file or show the defaults",
        description="Inspect peermirror's node configuration.",
    )
    actions = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    check = actions.add_parser(
        "check",
        help="validate a config file and print the effective config",
        description=(
            "Load the config file with PEERMIRROR_* environment overrides applied, print the "
            "effective configuration as YAML, and exit 0; exit 2 with the error when invalid."
        ),
    )
    add_config_option(check)
    check.set_defaults(handler=_check)

    defaults = actions.add_parser(
        "show-defaults",
        help="print every setting with its default and meaning",
        description="Print the built-in defaults as a commented YAML config file.",
    )
    defaults.set_defaults(handler=_show_defaults)


def _check(args: argparse.Namespace) -> int:
    cfg = load_node_config(args)
    print(yaml.safe_dump(dump_config(cfg), sort_keys=False), end="")
    return 0


def _show_defaults(args: argparse.Namespace) -> int:
    docs = {key: doc for key, _type, _default, doc in describe_config()}
    types = {key: type_name for key, type_name, _default, _doc in describe_config()}
    print(render_commented(dump_config(load_config(None)), docs, types), end="")
    return 0


def render_commented(
    data: Mapping[str, Any], docs: Mapping[str, str], types: Mapping[str, str]
) -> str:
    """YAML for a two-level config mapping with each key's type and doc as a comment above it."""
    lines: list[str] = []
    for section, keys in data.items():
        lines.append(f"{section}:")
        for key, value in keys.items():
            dotted = f"{section}.{key}"
            lines.append(f"  # {docs.get(dotted, '')} ({types.get(dotted, '?')})")
            dumped = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False)
            lines.extend(f"  {line}" for line in dumped.splitlines())
        lines.append("")
    return "\n".join(lines)
