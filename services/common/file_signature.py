"""What tells a changed file from an unchanged one without reading it: inode, size, mtime."""

from __future__ import annotations

import os
from pathlib import Path

# (inode, size, modification time in ns); None when the file cannot be stat'ed (absent).
FileSignature = tuple[int, int, int] | None


def file_signature(path: Path) -> FileSignature:
    """What changes when `path` is replaced (inode) or written (size, mtime); None when absent
    or unreadable, so a watcher re-reads it once it is back."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
