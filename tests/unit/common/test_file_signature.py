"""file_signature: unchanged while a file is untouched, changed when it is rewritten or
replaced, None while it is absent."""

from __future__ import annotations

import os
from pathlib import Path

from services.common.file_signature import file_signature


def test_an_absent_file_has_no_signature(tmp_path: Path) -> None:
    assert file_signature(tmp_path / "missing.yaml") is None


def test_the_signature_stays_until_the_file_is_written_or_replaced(tmp_path: Path) -> None:
    path = tmp_path / "registries.yaml"
    path.write_text("mirrors: {}\n")
    first = file_signature(path)
    assert first is not None
    assert file_signature(path) == first

    path.write_text("mirrors: {docker.io: {}}\n")
    written = file_signature(path)
    assert written is not None and written != first

    # Same size and mtime, another inode: a rename over the file is seen as well.
    replacement = tmp_path / "new.yaml"
    replacement.write_text("mirrors: {docker.io: {}}\n")
    os.utime(replacement, ns=(written[2], written[2]))
    os.replace(replacement, path)
    replaced = file_signature(path)
    assert replaced is not None and replaced != written
    assert replaced[1:] == written[1:]


def test_a_path_that_cannot_be_stated_has_no_signature(tmp_path: Path) -> None:
    # A component that is a file (ENOTDIR), not a missing file: still no signature.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert file_signature(blocker / "registries.yaml") is None
