"""The end of a log a test process wrote, for failure messages."""

from __future__ import annotations

from pathlib import Path


def log_tail(path: Path, lines: int, missing: str = "(no log)") -> str:
    """The last `lines` lines of the log at `path` (undecodable bytes replaced), or `missing`
    when the process never wrote it."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return missing
    return "\n".join(text.splitlines()[-lines:])
