"""Deciding which images-directory files to (re)import, and when: pure logic, no I/O.

K3s's rule: a file is imported when it is new, or when its size changed and its mtime is newer
than at the last import; changes must settle (2 s) first so half-copied files are not read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.pinner.airgap.formats import FileKind, classify


@dataclass(frozen=True, slots=True)
class FileStat:
    """What the watcher compares: size and modification time."""

    size: int
    mtime: float


def needs_import(previous: FileStat | None, current: FileStat) -> bool:
    """New file, or size changed and mtime newer than at the last import attempt."""
    if previous is None:
        return True
    return current.size != previous.size and current.mtime > previous.mtime


class ChangeTracker:
    """Remembers what was imported and which changed files are waiting to settle."""

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._done: dict[Path, FileStat] = {}
        # path -> (stat when last seen changing, time first seen with that stat)
        self._pending: dict[Path, tuple[FileStat, float]] = {}

    def record(self, path: Path, stat: FileStat) -> None:
        """An import attempt of `path` as it was at `stat` finished (success or failure)."""
        self._done[path] = stat
        self._pending.pop(path, None)

    def recorded(self, path: Path) -> FileStat | None:
        return self._done.get(path)

    def pending(self) -> list[Path]:
        return sorted(self._pending)

    def changed(self, listing: Mapping[Path, FileStat]) -> list[Path]:
        """Files of `listing` that need importing, ignoring the settle delay."""
        return sorted(p for p, st in listing.items() if needs_import(self._done.get(p), st))

    def observe(self, now: float, listing: Mapping[Path, FileStat]) -> list[Path]:
        """Feed a directory listing taken at `now`; returns the files ready to import."""
        for path in list(self._pending):
            if path not in listing:
                del self._pending[path]
        ready: list[Path] = []
        for path in self.changed(listing):
            stat = listing[path]
            seen = self._pending.get(path)
            if seen is None or seen[0] != stat:
                # New or still changing: (re)start its settle delay.
                self._pending[path] = (stat, now)
            elif now - seen[1] >= self.settle:
                ready.append(path)
        return ready

    def forget_missing(self, listing: Mapping[Path, FileStat]) -> None:
        """Drop state of files no longer present (a file put back later counts as new)."""
        for path in list(self._done):
            if path not in listing:
                del self._done[path]


def scan(directory: Path) -> dict[Path, tuple[FileKind, FileStat]]:
    """Every importable file under `directory` (recursive); empty when it does not exist."""
    found: dict[Path, tuple[FileKind, FileStat]] = {}
    if not directory.is_dir():
        return found
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            kind = classify(name)
            if kind is None:
                continue
            path = Path(root) / name
            try:
                st = path.stat()
            except OSError:
                continue  # removed while we looked
            found[path] = (kind, FileStat(st.st_size, st.st_mtime))
    return found
