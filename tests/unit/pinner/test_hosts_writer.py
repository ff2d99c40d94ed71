"""Writing hosts.toml into certs.d: atomic, only our own directories, nothing changed on errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.k3s.registries import RegistriesError
from services.pinner.hosts_toml import MARKER, HostsOptions
from services.pinner.hosts_writer import (
    LOCK_FILE,
    HostsLockedError,
    hosts_lock,
    in_step,
    is_generated,
    write_containerd_config,
    write_hosts_files,
)

OPTS = HostsOptions(embedded_mirror=False, server_override="http://127.0.0.1:9")
HAND_WRITTEN = 'server = "https://hand.example.com"\n\n[host."https://x.example.com"]\n'
# Two mirrored registries, so a directory is generated for each.
TWO_MIRRORED = (
    "mirrors:\n"
    "  docker.io:\n"
    "    endpoint: [m.example.com]\n"
    "  ghcr.io:\n"
    "    endpoint: [m.example.com]\n"
)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` with its bytes and inode (a rewrite changes the inode)."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_ino)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def entries(root: Path) -> list[str]:
    """The names in `root` besides the writers' lock file (which stays, empty)."""
    return sorted(name for name in os.listdir(root) if name != LOCK_FILE)


def registries(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registries.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs.d"
    out.mkdir()
    hand = out / "quay.io"
    hand.mkdir()
    (hand / "hosts.toml").write_text(HAND_WRITTEN)
    docker_style = out / "r.example.com:5000"
    docker_style.mkdir()
    (docker_style / "ca.crt").write_text("cert")
    return out


def test_writes_files_and_returns_their_paths(tmp_path: Path, certs: Path) -> None:
    reg = registries(
        tmp_path,
        "mirrors:\n"
        "  docker.io:\n"
        "    endpoint: [m.example.com]\n"
        "  '*':\n"
        "    endpoint: [m.example.com]\n",
    )
    paths = write_containerd_config(reg, certs, OPTS)
    assert paths == [certs / "_default" / "hosts.toml", certs / "docker.io" / "hosts.toml"]
    for p in paths:
        assert p.read_text().splitlines()[0] == MARKER
        assert 'server = "http://127.0.0.1:9/v2"' in p.read_text()
        assert (p.stat().st_mode & 0o777) == 0o644
    # Nothing temporary is left behind.
    assert entries(certs) == [
        "_default",
        "docker.io",
        "quay.io",
        "r.example.com:5000",
    ]
    assert sorted(e.name for e in (certs / "docker.io").iterdir()) == ["hosts.toml"]


def test_missing_out_dir_is_created(tmp_path: Path) -> None:
    reg = registries(tmp_path, "mirrors:\n  docker.io:\n    endpoint: [m.example.com]\n")
    out = tmp_path / "a" / "b" / "certs.d"
    assert write_containerd_config(reg, out, OPTS) == [out / "docker.io" / "hosts.toml"]


def test_hand_written_directories_are_never_touched(tmp_path: Path, certs: Path) -> None:
    before = snapshot(certs)
    reg = registries(
        tmp_path,
        "mirrors:\n  quay.io:\n    endpoint: [m.example.com]\n"
        "  r.example.com:5000:\n    endpoint: [m.example.com]\n",
    )
    assert write_containerd_config(reg, certs, OPTS) == []
    assert snapshot(certs) == before
    report = write_hosts_files(certs, {"quay.io": "x", "r.example.com:5000": "y"})
    assert report.skipped == [certs / "quay.io", certs / "r.example.com:5000"]
    assert all("left alone" in w for w in report.warnings)
    assert snapshot(certs) == before


def test_stale_generated_directories_are_removed_others_kept(tmp_path: Path, certs: Path) -> None:
    reg = registries(tmp_path, TWO_MIRRORED)
    write_containerd_config(reg, certs, OPTS)
    assert is_generated(certs / "ghcr.io")
    reg.write_text("mirrors:\n  docker.io:\n    endpoint: [m.example.com]\n")
    paths = write_containerd_config(reg, certs, OPTS)
    assert paths == [certs / "docker.io" / "hosts.toml"]
    assert not (certs / "ghcr.io").exists()
    assert (certs / "quay.io" / "hosts.toml").read_text() == HAND_WRITTEN
    assert (certs / "r.example.com:5000" / "ca.crt").read_text() == "cert"


def test_marker_must_be_the_first_line(tmp_path: Path, certs: Path) -> None:
    # A copy of our file that someone edited above the marker is theirs now.
    edited = certs / "ghcr.io"
    edited.mkdir()
    (edited / "hosts.toml").write_text("# mine\n" + MARKER + "\n")
    reg = registries(tmp_path, "mirrors:\n  docker.io:\n    endpoint: [m.example.com]\n")
    write_containerd_config(reg, certs, OPTS)
    assert (edited / "hosts.toml").exists()
    assert not is_generated(edited)


def test_missing_registries_file_removes_only_ours_when_allowed(
    tmp_path: Path, certs: Path
) -> None:
    reg = registries(tmp_path, "mirrors:\n  docker.io:\n    endpoint: [m.example.com]\n")
    write_containerd_config(reg, certs, OPTS)
    reg.unlink()
    with pytest.raises(RegistriesError, match="file not found"):
        write_containerd_config(reg, certs, OPTS)
    assert (certs / "docker.io").exists()
    assert write_containerd_config(reg, certs, OPTS, missing_ok=True) == []
    assert entries(certs) == ["quay.io", "r.example.com:5000"]


@pytest.mark.parametrize(
    "bad",
    [
        "mirrors:\n  docker.io:\n    endpoint: [ftp://x]\n",
        "mirrors:\n  docker.io:\n    rewrite: {'(': x}\n",
        "mirrors: [\n",
        "mirrors: {}\nconfigs:\n  x.io:\n    tls: {ca_file: relative.pem}\n",
    ],
)
def test_invalid_input_changes_no_file(tmp_path: Path, certs: Path, bad: str) -> None:
    reg = registries(tmp_path, TWO_MIRRORED)
    write_containerd_config(reg, certs, OPTS)
    before = snapshot(certs)
    reg.write_text(bad)
    with pytest.raises(RegistriesError) as info:
        write_containerd_config(reg, certs, OPTS)
    assert str(info.value).startswith(str(reg))
    assert snapshot(certs) == before


def test_unchanged_files_are_not_rewritten(tmp_path: Path, certs: Path) -> None:
    reg = registries(tmp_path, "mirrors:\n  docker.io:\n    endpoint: [m.example.com]\n")
    write_containerd_config(reg, certs, OPTS)
    before = snapshot(certs)
    assert write_containerd_config(reg, certs, OPTS) == [certs / "docker.io" / "hosts.toml"]
    assert snapshot(certs) == before


def test_changed_file_is_replaced_by_rename(tmp_path: Path, certs: Path) -> None:
    reg = registries(tmp_path, "mirrors:\n  docker.io:\n    endpoint: [m.example.com]\n")
    write_containerd_config(reg, certs, OPTS)
    path = certs / "docker.io" / "hosts.toml"
    inode = path.stat().st_ino
    reg.write_text("mirrors:\n  docker.io:\n    endpoint: [n.example.com]\n")
    write_containerd_config(reg, certs, OPTS)
    assert "n.example.com" in path.read_text()
    # A new inode: the old file was replaced whole, never truncated and rewritten in place.
    assert path.stat().st_ino != inode


def test_empty_existing_directory_is_used(certs: Path) -> None:
    (certs / "ghcr.io").mkdir()
    report = write_hosts_files(certs, {"ghcr.io": MARKER + "\n[host]\n"})
    assert report.written == [certs / "ghcr.io" / "hosts.toml"]


def test_leftover_temp_entries_are_cleaned(certs: Path) -> None:
    (certs / ".peermirror-tmp-abc").mkdir()
    (certs / ".peermirror-tmp-abc" / "hosts.toml").write_text(MARKER)
    (certs / ".peermirror-tmp-file").write_text("x")
    write_hosts_files(certs, {})
    assert entries(certs) == ["quay.io", "r.example.com:5000"]


def test_shadowing_directory_is_reported(certs: Path) -> None:
    (certs / "r.example.com_5000_").mkdir()
    report = write_hosts_files(certs, {"ghcr.io:443": MARKER + "\n[host]\n"})
    assert report.warnings == []
    (certs / "ghcr.io_443_").mkdir()
    report = write_hosts_files(certs, {"ghcr.io:443": MARKER + "\n[host]\n"})
    assert report.unchanged == [certs / "ghcr.io:443" / "hosts.toml"]
    assert len(report.warnings) == 1 and "ghcr.io_443_" in report.warnings[0]


def test_symlinks_are_left_alone(tmp_path: Path, certs: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "hosts.toml").write_text(MARKER + "\n")
    (certs / "ghcr.io").symlink_to(elsewhere)
    report = write_hosts_files(certs, {"ghcr.io": MARKER + "\n[host]\n"})
    assert report.skipped == [certs / "ghcr.io"]
    write_hosts_files(certs, {})
    assert (certs / "ghcr.io").is_symlink()
    assert (elsewhere / "hosts.toml").read_text() == MARKER + "\n"


K3S_FILE = (
    "# File generated by k3s. DO NOT EDIT. Changes will be lost.\n"
    'server = "https://registry-1.docker.io"\n'
)


def test_directory_k3s_rewrote_is_taken_back(certs: Path) -> None:
    # K3s removes the directory and writes its own file (no mirror) at every start.
    (certs / "docker.io").mkdir(mode=0o700)
    (certs / "docker.io" / "hosts.toml").write_text(K3S_FILE)
    ours = MARKER + "\n[host]\n"
    assert not in_step(certs, {"docker.io": ours})
    report = write_hosts_files(certs, {"docker.io": ours})
    assert report.retaken == [certs / "docker.io"]
    assert (certs / "docker.io" / "hosts.toml").read_text() == ours
    assert in_step(certs, {"docker.io": ours})


def test_k3s_directories_we_do_not_render_are_left_to_k3s(certs: Path) -> None:
    (certs / "ghcr.io").mkdir()
    (certs / "ghcr.io" / "hosts.toml").write_text(K3S_FILE)
    report = write_hosts_files(certs, {})
    assert report.removed == [] and (certs / "ghcr.io" / "hosts.toml").read_text() == K3S_FILE


def test_in_step_ignores_hand_written_directories_and_sees_drift(certs: Path) -> None:
    ours = MARKER + "\n[host]\n"
    # quay.io is hand-written: never ours to write, so never a reason to write.
    assert not in_step(certs, {"docker.io": ours, "quay.io": ours})
    write_hosts_files(certs, {"docker.io": ours, "quay.io": ours})
    assert in_step(certs, {"docker.io": ours, "quay.io": ours})
    (certs / "docker.io" / "hosts.toml").write_text(MARKER + "\nedited\n")
    assert not in_step(certs, {"docker.io": ours})
    write_hosts_files(certs, {"docker.io": ours})
    # A stale directory of ours is drift too.
    assert not in_step(certs, {})


def test_writers_wait_for_the_lock(certs: Path) -> None:
    with hosts_lock(certs):
        with pytest.raises(HostsLockedError, match=LOCK_FILE):
            write_hosts_files(certs, {"docker.io": MARKER + "\n"}, lock_timeout=0.2)
        assert not (certs / "docker.io").exists()
    assert write_hosts_files(certs, {"docker.io": MARKER + "\n"}, lock_timeout=0.2).written
