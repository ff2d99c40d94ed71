"""The hosts keeper on a temporary certs.d: reads registries.yaml only when it changed, keeps the
last good files when it turns invalid, writes only on drift, and writes nothing when told not to."""

from __future__ import annotations

import os
from pathlib import Path

from services.pinner.hosts_keeper import HostsKeeper
from services.pinner.hosts_toml import MARKER, HostsOptions

OPTS = HostsOptions(embedded_mirror=True, mirror_tls=False, server_override="http://127.0.0.1:9")


def keeper(tmp_path: Path, text: str | None, *, write: bool = True) -> HostsKeeper:
    registries = tmp_path / "registries.yaml"
    if text is not None:
        registries.write_text(text)
    return HostsKeeper(registries, tmp_path / "certs.d", OPTS, interval=1.0, write=write)


def replace(path: Path, text: str) -> None:
    tmp = path.with_name(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_reads_registries_only_when_the_file_changed(tmp_path: Path) -> None:
    k = keeper(tmp_path, "mirrors:\n  docker.io: {}\n")
    first = k.check()
    assert first is not None and list(first.mirrors) == ["docker.io"]
    hosts = tmp_path / "certs.d" / "docker.io" / "hosts.toml"
    assert hosts.read_text().startswith(MARKER)
    inode = hosts.stat().st_ino
    assert k.check() is None
    assert hosts.stat().st_ino == inode  # in step: not rewritten
    replace(k.registries_file, "mirrors:\n  quay.io: {}\n")
    again = k.check()
    assert again is not None and list(again.mirrors) == ["quay.io"]
    assert (tmp_path / "certs.d" / "quay.io" / "hosts.toml").exists()
    assert not (tmp_path / "certs.d" / "docker.io").exists()


def test_an_invalid_file_keeps_the_last_good_hosts(tmp_path: Path) -> None:
    k = keeper(tmp_path, "mirrors:\n  docker.io: {}\n")
    k.check()
    replace(k.registries_file, "mirrors: [\n")
    assert k.check() is None
    hosts = tmp_path / "certs.d" / "docker.io" / "hosts.toml"
    # Still put right from the last good file when our file is edited.
    hosts.write_text(MARKER + "\nedited\n")
    k.check()
    assert "127.0.0.1:9" in hosts.read_text()


def test_a_missing_file_means_nothing_mirrored(tmp_path: Path) -> None:
    k = keeper(tmp_path, "mirrors:\n  docker.io: {}\n")
    k.check()
    k.registries_file.unlink()
    gone = k.check()
    assert gone is not None and not gone.mirrors
    assert not (tmp_path / "certs.d" / "docker.io").exists()


def test_follows_registries_without_writing_when_told_not_to(tmp_path: Path) -> None:
    k = keeper(tmp_path, "mirrors:\n  docker.io: {}\n", write=False)
    registries = k.check()
    assert registries is not None and registries.is_mirrored("docker.io")
    assert not (tmp_path / "certs.d").exists()
