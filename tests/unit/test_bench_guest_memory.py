"""The benchmarks' memory touch (bench/guest_memory.py): it touches what was asked, never what
the machine cannot spare."""

from __future__ import annotations

import pytest

from bench import guest_memory


def test_touches_the_memory_asked_for() -> None:
    touched, seconds = guest_memory.touch(0.25)
    assert touched == pytest.approx(0.25)
    assert seconds >= 0


def test_leaves_the_machine_its_spare_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    spare = guest_memory.SPARE
    monkeypatch.setattr(guest_memory, "available_bytes", lambda: spare + 3 * guest_memory.PIECE)
    touched, _ = guest_memory.touch(100)
    assert touched * guest_memory.GIB == 3 * guest_memory.PIECE
    monkeypatch.setattr(guest_memory, "available_bytes", lambda: spare // 2)
    assert guest_memory.touch(100)[0] == 0


def test_reads_the_available_memory_of_this_machine() -> None:
    assert guest_memory.available_bytes() > 0
