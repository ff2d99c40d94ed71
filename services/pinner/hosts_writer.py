"""Puts rendered hosts.toml files into containerd's certs.d atomically, touching only our own dirs.

Everything is parsed and rendered before the first write, so an invalid registries.yaml changes
nothing. A file appears by rename (temp file in the same directory, or a temp directory renamed
into place), so containerd, which re-reads hosts.toml on every pull, never sees half a file.
A directory is ours when its hosts.toml starts with the marker line; any other directory
(hand-written hosts.toml, Docker-style cert files) is never written into or removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.k3s.registries import load_registries
from services.common.logsetup import get_logger
from services.pinner.hosts_toml import MARKER, HostsOptions, render_hosts_files

HOSTS_FILE = "hosts.toml"
# Temp names start with a dot, so containerd (which looks up exact host names) never reads them.
_TMP_PREFIX = ".peermirror-tmp-"

log = get_logger("pinner.hosts")


@dataclass(slots=True)
class WriteReport:
    """What one write pass did: files in place, stale dirs removed, dirs left alone (and why)."""

    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Every generated hosts.toml now in place, written or already up to date."""
        return sorted(self.written + self.unchanged)


def is_generated(directory: Path) -> bool:
    """Whether `directory` holds a hosts.toml whose first line is our marker."""
    try:
        with (directory / HOSTS_FILE).open("r", encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\r\n") == MARKER
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _create_dir_atomic(out_dir: Path, name: str, text: str) -> None:
    tmp_dir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out_dir))
    try:
        os.chmod(tmp_dir, 0o755)
        _write_file_atomic(tmp_dir / HOSTS_FILE, text)
        os.rename(tmp_dir, out_dir / name)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _remove_dir_atomic(out_dir: Path, directory: Path) -> None:
    # Renamed away first: containerd sees the directory either complete or gone.
    graveyard = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out_dir))
    os.rename(directory, graveyard / "old")
    shutil.rmtree(graveyard, ignore_errors=True)


def _shadowing_dir(name: str) -> str | None:
    """containerd looks up `h_p_` before `h:p`: the name that would hide our `h:p` directory."""
    idx = name.rfind(":")
    if idx <= 0:
        return None
    return f"{name[:idx]}_{name[idx + 1 :]}_"


def write_hosts_files(out_dir: Path, files: Mapping[str, str]) -> WriteReport:
    """Make `out_dir` hold exactly `files` (dir name -> hosts.toml text) among our directories."""
    report = WriteReport()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Leftovers of a pass that died half-way.
    for entry in out_dir.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
    for name, text in files.items():
        target = out_dir / name
        path = target / HOSTS_FILE
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            report.skipped.append(target)
            report.warnings.append(f"{target} is not a directory we wrote; left alone")
            continue
        if target.is_dir():
            if is_generated(target):
                if path.read_text(encoding="utf-8", errors="replace") == text:
                    report.unchanged.append(path)
                else:
                    _write_file_atomic(path, text)
                    report.written.append(path)
            elif not any(target.iterdir()):
                _write_file_atomic(path, text)
                report.written.append(path)
            else:
                report.skipped.append(target)
                report.warnings.append(
                    f"{target} holds a hand-written configuration; left alone, not replaced"
                )
                continue
        else:
            _create_dir_atomic(out_dir, name, text)
            report.written.append(path)
        shadow = _shadowing_dir(name)
        if shadow is not None and (out_dir / shadow).exists():
            report.warnings.append(
                f"{out_dir / shadow} exists and containerd reads it before {target}"
            )
    # New files are in place before stale ones go, so no pull ever finds no configuration.
    for entry in sorted(out_dir.iterdir()):
        if entry.name in files or entry.is_symlink() or not entry.is_dir():
            continue
        if is_generated(entry):
            _remove_dir_atomic(out_dir, entry)
            report.removed.append(entry)
    _fsync_dir(out_dir)
    return report


def write_containerd_config(
    registries_file: Path, out_dir: Path, opts: HostsOptions, *, missing_ok: bool = False
) -> list[Path]:
    """Render `registries_file` into `out_dir`; returns the generated hosts.toml paths.

    Raises RegistriesError (naming the file and key) before anything on disk changes.
    `missing_ok` treats a missing file as "no registries" (K3s), removing our directories.
    """
    registries = load_registries(registries_file, missing_ok=missing_ok)
    rendered = render_hosts_files(registries, opts)
    report = write_hosts_files(out_dir, rendered.files)
    for warning in (*rendered.warnings, *report.warnings):
        log.warning("containerd hosts config", detail=warning)
    log.info(
        "containerd hosts config written",
        out_dir=str(out_dir),
        written=[str(p.parent.name) for p in report.written],
        unchanged=len(report.unchanged),
        removed=[p.name for p in report.removed],
    )
    return report.files
