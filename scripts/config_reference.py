"""Renders the README's config reference table from the config schema, so the docs cannot drift.

Run `python scripts/config_reference.py --write` after changing services/common/config.py;
tests/unit/test_readme_config.py fails while the README's table is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.config import describe_config

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table() -> str:
    """The markdown table: one row per config key, with type, default and meaning."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, doc in describe_config():
        lines.append(f"| `{key}` | {_cell(type_name)} | `{_cell(default)}` | {_cell(doc)} |")
    return "\n".join(lines)


def splice(readme: str, table: str) -> str:
    """Return ``readme`` with the text between the markers replaced by ``table``."""
    head, sep, rest = readme.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"README lacks the {START} / {END} markers")
    return f"{head}{START}\n{table}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite README.md in place")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    updated = splice(text, render_table())
    if args.write:
        README.write_text(updated, encoding="utf-8")
        return 0
    if updated != text:
        print("README.md config reference is stale: run scripts/config_reference.py --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
