"""`peermirror config ...`: validate a node config and show the effective or default settings."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import yaml

from services.cli.args import Subparsers, add_config_option, load_node_config
from services.common.config import (
    ConfigError,
    NodeConfig,
    describe_config,
    dump_config,
    load_config,
)


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
            "Load the config file with PEERMIRROR_* environment overrides applied, run every "
            "check the services make at start (key types and ranges, combinations of keys, "
            "the TLS files and registries.yaml it names), print the effective configuration "
            "as YAML and exit 0; exit 2 naming every bad key and the file when invalid."
        ),
    )
    add_config_option(check)
    check.add_argument(
        "--skip-files",
        action="store_true",
        help=(
            "check the config alone, not the files it names (TLS files, registries.yaml): "
            "for checking a node's config on another machine"
        ),
    )
    check.set_defaults(handler=_check)

    defaults = actions.add_parser(
        "show-defaults",
        help="print every setting with its default and meaning",
        description="Print the built-in defaults as a commented YAML config file.",
    )
    defaults.set_defaults(handler=_show_defaults)


def _check(args: argparse.Namespace) -> int:
    cfg = load_node_config(args)
    source = "defaults" if args.config is None else str(args.config)
    problems = start_problems(cfg, files=not args.skip_files)
    if problems:
        raise ConfigError("; ".join(f"{source}: {problem}" for problem in problems))
    print(yaml.safe_dump(dump_config(cfg), sort_keys=False), end="")
    return 0


def start_problems(cfg: NodeConfig, *, files: bool) -> list[str]:
    """What the services would refuse at start beyond what loading checks, each naming its key.

    Calls the services' own start-up builders, so a check added there is checked here too.
    """
    from services.common.k3s.registries import RegistriesError, load_registries
    from services.common.tls import client_context, server_context, tls_files
    from services.discovery.service import dht_config
    from services.pinner.hosts_toml import render_hosts_files
    from services.pinner.service import hosts_options

    problems: list[str] = []
    try:
        dht_config(cfg)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        options = hosts_options(cfg)
    except (ConfigError, ValueError) as exc:
        problems.append(f"pinner: {exc}")
        options = None
    if not files:
        return problems
    tls = tls_files(cfg)
    if tls is not None:
        try:
            tls.read()
            server_context(tls)
            client_context(tls)
        except ConfigError as exc:
            problems.append(str(exc))
    try:
        registries = load_registries(cfg.registry.registries_file, missing_ok=True)
        if options is not None and cfg.pinner.write_hosts:
            render_hosts_files(registries, options)
    except RegistriesError as exc:
        problems.append(f"registry.registries_file: {exc}")
    return problems


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
