"""The README's config reference must list exactly the keys the loader accepts."""

from __future__ import annotations

from scripts.config_reference import README, render_table, splice


def test_readme_config_reference_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    assert splice(text, render_table()) == text, (
        "README.md config reference is stale: "
        "run .venv/bin/python scripts/config_reference.py --write"
    )
