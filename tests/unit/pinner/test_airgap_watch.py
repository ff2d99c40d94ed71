"""The re-import rule, the settle delay, list files and pin reference handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.pinner.airgap.formats import FileKind
from services.pinner.airgap.pull import parse_list
from services.pinner.airgap.watch import ChangeTracker, FileStat, needs_import, scan
from services.pinner.pins import (
    MANAGED_LABEL,
    PIN_LABEL,
    SOURCE_LABEL,
    InvalidReferenceError,
    candidate_names,
    managed_labels,
)

A = Path("/images/a.tar")


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        (None, FileStat(1, 1.0), True),
        (FileStat(1, 1.0), FileStat(1, 1.0), False),
        (FileStat(1, 1.0), FileStat(2, 2.0), True),
        # Same size, newer mtime (a touch): K3s does not re-import.
        (FileStat(1, 1.0), FileStat(1, 5.0), False),
        # Size changed but mtime older (restored from backup): not re-imported either.
        (FileStat(1, 5.0), FileStat(2, 1.0), False),
    ],
)
def test_needs_import(previous: FileStat | None, current: FileStat, expected: bool) -> None:
    assert needs_import(previous, current) is expected


def test_tracker_waits_for_the_file_to_settle() -> None:
    tracker = ChangeTracker(settle=2.0)
    assert tracker.observe(0.0, {A: FileStat(10, 1.0)}) == []
    assert tracker.pending() == [A]
    # Still growing: the settle delay starts again.
    assert tracker.observe(1.5, {A: FileStat(20, 2.0)}) == []
    assert tracker.observe(3.0, {A: FileStat(20, 2.0)}) == []
    assert tracker.observe(3.5, {A: FileStat(20, 2.0)}) == [A]
    tracker.record(A, FileStat(20, 2.0))
    assert tracker.pending() == []
    assert tracker.observe(10.0, {A: FileStat(20, 2.0)}) == []
    # Replaced by a different archive: imported again after settling.
    assert tracker.observe(11.0, {A: FileStat(30, 9.0)}) == []
    assert tracker.observe(13.0, {A: FileStat(30, 9.0)}) == [A]


def test_tracker_forgets_removed_files() -> None:
    tracker = ChangeTracker(settle=0.0)
    tracker.record(A, FileStat(1, 1.0))
    tracker.forget_missing({})
    assert tracker.recorded(A) is None
    assert tracker.changed({A: FileStat(1, 1.0)}) == [A]
    tracker.observe(0.0, {A: FileStat(1, 1.0)})
    tracker.observe(1.0, {})
    assert tracker.pending() == []


def test_scan_is_recursive_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    (tmp_path / "a.tar.zst").write_bytes(b"x")
    (tmp_path / "sub" / "b.txt").write_text("alpine\n")
    (tmp_path / "sub" / ".hidden" / "c.tar").write_bytes(b"x")
    (tmp_path / "notes.md").write_text("no")
    found = scan(tmp_path)
    assert {p.relative_to(tmp_path).as_posix(): k for p, (k, _) in found.items()} == {
        "a.tar.zst": FileKind.ZSTD,
        "sub/b.txt": FileKind.LIST,
    }
    assert scan(tmp_path / "missing") == {}


def test_parse_list() -> None:
    text = "# comment\nalpine:3.19\n\n  reg.test/a:1  # trailing\nalpine:3.19\n"
    assert parse_list(text) == ["alpine:3.19", "reg.test/a:1"]


def test_candidate_names_normalise_like_containerd() -> None:
    assert candidate_names("alpine:3.19") == ["alpine:3.19", "docker.io/library/alpine:3.19"]
    assert candidate_names("alpine") == ["alpine", "docker.io/library/alpine:latest"]
    assert candidate_names("reg.test/a:1") == ["reg.test/a:1"]
    assert candidate_names("sha256:" + "a" * 64) == ["sha256:" + "a" * 64]
    with pytest.raises(InvalidReferenceError):
        candidate_names("Not A Ref")
    with pytest.raises(InvalidReferenceError):
        candidate_names("  ")


def test_managed_labels() -> None:
    labels = managed_labels("/images/a.tar")
    assert labels == {
        PIN_LABEL: "pinned",
        MANAGED_LABEL: "pinned",
        SOURCE_LABEL: "/images/a.tar",
    }
    assert SOURCE_LABEL not in managed_labels("/" + "x" * 5000)
