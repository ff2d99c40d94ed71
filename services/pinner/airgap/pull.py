"""The image list files of the air-gap directory: a `.txt` file names images to pull through CRI."""

from __future__ import annotations


def parse_list(text: str) -> list[str]:
    """Image references of a list file: one per line; blank lines and `#` comments skipped."""
    refs: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and line not in refs:
            refs.append(line)
    return refs
