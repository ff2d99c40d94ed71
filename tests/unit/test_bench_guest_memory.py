"""The benchmarks' memory controls (bench/guest_memory.py): the touch takes what was asked, never
what the machine cannot spare; the hold on free page reporting is undone whatever happens."""

from __future__ import annotations

from pathlib import Path

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


def _knobs(tmp_path: Path, **values: str) -> Path:
    for name, value in values.items():
        (tmp_path / name).write_text(f"{value}\n")
    return tmp_path


def test_holds_freed_pages_for_the_run_and_restores_the_settings(tmp_path: Path) -> None:
    knobs = _knobs(tmp_path, min_free_ms="0", max_waiting_mib="1024")
    wanted = guest_memory.hold_settings(guest_memory.memory_total_mib())
    with guest_memory.freed_pages_kept(knobs) as note:
        assert (knobs / "min_free_ms").read_text() == wanted["min_free_ms"]
        assert (knobs / "max_waiting_mib").read_text() == wanted["max_waiting_mib"]
        assert "held off" in note and "min_free_ms 0 -> 300000" in note
    assert (knobs / "min_free_ms").read_text() == "0"
    assert (knobs / "max_waiting_mib").read_text() == "1024"


def test_restores_the_settings_when_the_run_fails(tmp_path: Path) -> None:
    knobs = _knobs(tmp_path, min_free_ms="0", max_waiting_mib="1024")
    with pytest.raises(RuntimeError), guest_memory.freed_pages_kept(knobs):
        raise RuntimeError("the benchmark broke")
    assert (knobs / "min_free_ms").read_text() == "0"
    assert (knobs / "max_waiting_mib").read_text() == "1024"


def test_a_kernel_without_the_knobs_is_left_alone(tmp_path: Path) -> None:
    with guest_memory.freed_pages_kept(tmp_path / "absent") as note:
        assert "no knobs" in note
    assert not (tmp_path / "absent").exists()


def test_memory_total_is_read_from_this_machine() -> None:
    assert guest_memory.memory_total_mib() > 0
