"""Mirrored registries follow registries.yaml, re-read when it changes."""

from __future__ import annotations

import os
from pathlib import Path

from services.registry.mirrored import MirroredRegistries


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reads_mirrors_and_reloads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "registries.yaml"
    path.write_text("mirrors:\n  docker.io: {}\n")
    clock = Clock()
    mirrored = MirroredRegistries(path, recheck_s=2.0, clock=clock)
    assert mirrored.is_mirrored("docker.io") and not mirrored.is_mirrored("ghcr.io")
    path.write_text('mirrors:\n  "*": {}\n')
    os.utime(path, ns=(1, 10**18))
    assert not mirrored.is_mirrored("ghcr.io")  # not re-checked yet
    clock.now = 2.5
    assert mirrored.is_mirrored("ghcr.io")


def test_missing_file_mirrors_nothing(tmp_path: Path) -> None:
    assert not MirroredRegistries(tmp_path / "absent.yaml").is_mirrored("docker.io")


def test_invalid_file_keeps_the_previous_mirrors(tmp_path: Path) -> None:
    path = tmp_path / "registries.yaml"
    path.write_text("mirrors:\n  docker.io: {}\n")
    clock = Clock()
    mirrored = MirroredRegistries(path, recheck_s=1.0, clock=clock)
    path.write_text("mirrors: [not, a, mapping]\n")
    os.utime(path, ns=(1, 10**18))
    clock.now = 5.0
    assert mirrored.is_mirrored("docker.io")
